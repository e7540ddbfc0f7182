"""The one base class for a user's mistakes, so CLIs can tell them from bugs.

Every error caused by what the user gave (a config key, a data file, a
tokenizer file, a mesh, a checkpoint directory, a missing optional library)
derives from ``UserError``; its message names the file or key and the reason.
CLIs print it as one ``error: ...`` line and exit 2; anything else is a bug
and keeps its traceback. Pure Python: importing it never pulls in JAX.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; the message names the file or key and the reason."""


class MissingExtraError(UserError, ImportError):
    """An optional library this input needs is not installed; the message says which extra to install."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages are joined with '; ')."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
