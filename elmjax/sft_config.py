"""The ``sft:`` section: chat / instruction data for fine-tuning. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SFTConfig:
    # Chat or instruction JSONL files (see elmjax.sft_data); empty: fine-tune
    # on plain text read by the ``data:`` section instead.
    paths: tuple[str, ...] = ()
    # 'default' (elmjax.chat_template.DEFAULT_TEMPLATE), a Jinja template
    # string (contains '{%' or '{{'), or the path of a template file.
    template: str = "default"
    # Examples longer than data.seq_len + 1 tokens: 'drop' them (counted),
    # or cut the end ('right') or the start ('left', keeps the answer's end).
    truncation: Literal["drop", "right", "left"] = "right"
    add_eos: bool = True  # end every example with the tokenizer's EOS (trained on as an assistant token)
    train_on_prompt: bool = False  # loss on every token, not only assistant turns
    # Malformed lines tolerated (each logged with file:line and reason, then
    # dropped and counted in final.json); more than this stops the run.
    max_invalid: int = 0

    def __post_init__(self):
        if self.max_invalid < 0:
            raise ValueError(f"max_invalid must be >= 0, got {self.max_invalid}")
        if not self.template:
            raise ValueError("template must be 'default', a Jinja template or a template file path")
