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


@contextmanager
def backend_compiles():
    """Yields a list that collects the name of every program handed to XLA inside the block, from any thread
    (JAX's backend-compile monitoring event; a persistent-cache hit counts, a reused executable does not)."""
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    seen: list[str] = []

    def listen(event, duration_secs, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            seen.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
