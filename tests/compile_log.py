"""Count a jitted function's compilations through JAX's own compile log (``jax.log_compiles``)."""

import logging
from contextlib import contextmanager

import jax


class _Collect(logging.Handler):
    def __init__(self, name: str | None):
        super().__init__(logging.DEBUG)
        self.prefix = "Compiling jit(" + (f"{name})" if name else "")
        self.seen: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith(self.prefix):
            self.seen.append(msg)


@contextmanager
def compilations(name: str | None = None):
    """Yields a list that collects one message per compilation of ``jit(name)`` (any, if None) inside the block
    (in-memory cache misses: a persistent-cache hit still counts, a reused executable does not)."""
    handler = _Collect(name)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield handler.seen
    finally:
        logger.removeHandler(handler)
