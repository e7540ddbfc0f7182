"""What every ``python -m elmjax.*`` command shares: argument types, logging and exit statuses.

Pure Python: importing it never pulls in JAX.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from elmjax.errors import one_line

LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into a one-line usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (redirected, captured by tests, ...)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property wins
        pass


@contextlib.contextmanager
def cli_logging(level: int = logging.INFO):
    """While a CLI runs, show elmjax's own INFO messages (e.g. 'resumed ... from step N') on stderr.

    ``logging.basicConfig`` is a no-op here because importing JAX's
    dependencies already gives the root logger a handler, and raising the
    root level would flood the log with orbax/absl INFO. So the 'elmjax'
    logger gets its own handler and does not propagate (no double lines);
    all of it is undone on exit, for callers of ``main()`` in-process."""
    logger = logging.getLogger("elmjax")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    saved = logger.level, logger.propagate
    logger.setLevel(level)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def user_error_exit(error: BaseException, debug: bool) -> int:
    """A user's mistake as one 'error:' line and exit status 2 (with --debug, its traceback)."""
    if debug:
        raise error
    print(f"error: {one_line(error)}", file=sys.stderr)
    return 2


def run_exit(result, done_line) -> int:
    """Exit status of a finished training run: 1 if it diverged, else 0 after printing ``done_line(final)``."""
    if result.state == "diverged":
        print(f"run diverged: see {result.run_dir / 'status.json'}", file=sys.stderr)
        return 1
    print(done_line(result.final))
    return 0
