"""Grid problems: every error names the file, the YAML path and the reason; all are reported at once."""

from __future__ import annotations

from elmjax.config_io import ConfigError


class GridError(ConfigError):
    """One or more problems with a grid file; ``messages`` lists them all."""

    def __init__(self, messages: list[str]):
        self.messages = list(dict.fromkeys(messages))  # de-duplicated, in order
        shown = self.messages[:25]
        more = len(self.messages) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more" if more > 0 else ""))


class Problems:
    """Collects located messages while a grid is checked; ``raise_if_any`` raises them together."""

    def __init__(self, source: str):
        self.source, self.messages = source, []

    def add(self, where: str, reason: str) -> None:
        self.messages.append(f"{self.source}: {where}: {reason}")

    def add_located(self, message: str) -> None:
        """A message that already starts with its YAML path (from config_io)."""
        self.messages.append(f"{self.source}: {message}")

    def raise_if_any(self) -> None:
        if self.messages:
            raise GridError(self.messages)
