"""A run's compiled programs (state init, train step, eval step), kept for the next run of the same shapes.

A sweep trains the same model for several seeds, one after another, in one
process. The persistent compilation cache saves those runs the XLA compile,
but each still traces and lowers every program again (seconds for a tiny
model on a busy CPU). The executables compiled here are kept, keyed by
everything the programs depend on, so the next run of the same shapes reuses
them. The fresh state is assembled on the host where it can be
(``elmjax.host_state``: no init program); otherwise the seed is an argument
of the init program, not a constant in it, so one program serves every
seed. Only the latest few are kept: an executable
holds code, not buffers, but a ladder of large models should not pile them up.

``compile_ahead`` compiles the programs of a later run on one background
thread while the current run trains (``sweeps.ahead`` decides which), so
that ``compiled_programs`` finds them ready, or waits for the compile in
flight instead of starting the same one again. A failed ahead-of-time
compile is forgotten: the run compiles its programs itself and reports the
error as usual. The registry is shared by both threads, under one lock.
The worker thread is not a daemon: a process that ends while it compiles
waits for that compile (seconds to minutes) rather than tearing XLA down
under it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from elmjax.config import Config
from elmjax.host_state import host_creator
from elmjax.sharding import batch_divisor, batch_sharding, replicated
from elmjax.state import StateLayout, abstract_model, state_layout
from elmjax.train_program import abstract_batch, jit_train_step
from elmjax.train_step import make_eval_step

log = logging.getLogger(__name__)

KEEP = 4  # programs of this many distinct shapes stay compiled (more while some are in flight or in use)

# The compiled init program serves only states ``elmjax.host_state`` cannot
# assemble on the host (models over ``elmjax.init_draws.BATCH_LIMIT``, other
# keys, optimizer state that is not all zeros). Drawn per parameter (over the
# limit, or other keys: one unrolled threefry hash each), LLVM's full
# optimisation of it took longer than compiling the train step (2.9 of about
# 5.5 s per tiny model) for a program that runs once per run. LLVM's level 1
# compiles it 2-3x faster with the same bits: without fast-math flags LLVM may
# not change float results at any level except by contracting a*b+c into an
# FMA in instruction selection, which levels 1-3 do alike (level 0 does not,
# and changes the bits). tests/test_programs.py checks the bits against the
# default level.
CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 1}


@dataclass(frozen=True)
class Programs:
    create: object  # (seed: int32 scalar) -> TrainState, placed with the layout's shardings (host-built or compiled)
    train_step: object  # (state, batch [B, L+1]) -> (state, metrics); the state is donated
    eval_step: object  # (params, rows [eval_chunk, L+1], row weights [eval_chunk]) -> sums
    eval_chunk: int  # validation rows per eval_step call

    def init_state(self, seed: int):
        return self.create(np.int32(seed))


@dataclass
class _Entry:
    future: Future = field(default_factory=Future)
    ahead: bool = False  # compiled (or compiling) on the background thread
    taken: bool = False  # handed to a run (or given up on by a stopping sweep)
    job: Future | None = None  # the background task filling it, if compiled ahead


@dataclass
class AheadStats:
    compiled: int = 0  # program sets compiled ahead of their run
    seconds: float = 0.0  # time the background thread spent compiling them
    failed: int = 0


_lock = threading.Lock()
_compiled: OrderedDict[tuple, _Entry] = OrderedDict()
_in_use: tuple | None = None  # the key of the programs the current run took
_worker: ThreadPoolExecutor | None = None
stats = AheadStats()


def eval_chunk(config: Config, mesh) -> int:
    return max(config.data.batch_size, batch_divisor(mesh))


def program_key(config: Config, mesh) -> tuple:
    """Everything the three programs depend on (not the seed, run_dir, data source or schedule of saves)."""
    return (config.model, config.optimizer, config.total_steps, config.execution, config.data.batch_size,
            config.data.seq_len, mesh)


def compiled_programs(config: Config, mesh, layout: StateLayout) -> Programs:
    """The programs of ``config`` on ``mesh``: kept from an earlier run or compiled ahead (waiting for that
    compile if it is still running), else compiled now."""
    global _in_use
    key = program_key(config, mesh)
    with _lock:
        entry = _compiled.get(key)
        mine = entry is None
        if mine:
            entry = _compiled[key] = _Entry()
        _compiled.move_to_end(key)
        entry.taken, _in_use = True, key
    if mine:
        return _fill(key, entry, lambda: _compile(config, mesh, layout))
    try:
        return entry.future.result()
    except Exception as e:  # noqa: BLE001 - only an ahead compile's error lands here; compile it ourselves
        if not entry.ahead:
            raise
        log.info("compiling ahead failed (%s: %s); compiling for the run itself", type(e).__name__, e)
        return compiled_programs(config, mesh, layout)  # _fill dropped the failed entry


def compile_ahead(config: Config, mesh) -> bool:
    """Start compiling the programs of ``config`` on the background thread; False if they are kept or in flight."""
    global _worker
    key = program_key(config, mesh)
    with _lock:
        if key in _compiled:
            return False
        entry = _compiled[key] = _Entry(ahead=True)
        # One thread: ahead-of-time compiles queue behind each other, not beside each other.
        _worker = _worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="elmjax-compile-ahead")
        entry.job = _worker.submit(_compile_in_background, key, entry, config, mesh)
    return True


def is_kept(config: Config, mesh) -> bool:
    """Whether the programs of ``config`` are kept or in flight (so compiling them ahead would do nothing)."""
    with _lock:
        return program_key(config, mesh) in _compiled


def _compile_in_background(key: tuple, entry: _Entry, config: Config, mesh) -> None:
    start = time.perf_counter()
    try:
        _fill(key, entry, lambda: _compile(config, mesh, state_layout(config, mesh)))
    except Exception as e:  # noqa: BLE001 - kept in the future; the run compiles itself and reports it
        stats.failed += 1
        log.info("compiling ahead for %s failed: %s: %s", config.run_dir, type(e).__name__, e)
        return
    stats.compiled += 1
    stats.seconds += time.perf_counter() - start


def _fill(key: tuple, entry: _Entry, compile_fn) -> Programs:
    """Run ``compile_fn`` for ``entry``: its result for every waiter, or its error (and the entry forgotten)."""
    try:
        programs = compile_fn()
    except BaseException as e:
        with _lock:
            if _compiled.get(key) is entry:
                del _compiled[key]
        entry.future.set_exception(e)
        raise
    entry.future.set_result(programs)
    with _lock:
        _evict()
    return programs


def _evict() -> None:
    """Drop the least recently used finished entries beyond KEEP; never one in flight, in use or compiled
    ahead and not yet taken (those may exceed KEEP for a while)."""
    for key in list(_compiled):
        if len(_compiled) <= KEEP:
            return
        entry = _compiled[key]
        if entry.future.done() and key != _in_use and not (entry.ahead and not entry.taken):
            del _compiled[key]


def _compile(config: Config, mesh, layout: StateLayout) -> Programs:
    return Programs(
        # Assembled on the host where it can be (elmjax.host_state): the same bits, no init program to compile.
        create=host_creator(config.model, layout) or _compile_create(mesh, layout),
        # The same program preflight compiles.
        train_step=jit_train_step(config, mesh, layout).lower(layout.target, abstract_batch(config, mesh)).compile(),
        eval_step=_compile_eval_step(config, mesh, layout),
        eval_chunk=eval_chunk(config, mesh),
    )


def _compile_create(mesh, layout: StateLayout, options: dict | None = None):
    """The init program: seed -> TrainState; on CPU with ``CPU_INIT_OPTIONS`` unless ``options`` are given."""
    if options is None:
        options = CPU_INIT_OPTIONS if mesh.devices.flat[0].platform == "cpu" else {}
    seed = jax.ShapeDtypeStruct((), jnp.int32)
    return jax.jit(layout.create, out_shardings=layout.shardings).lower(seed).compile(compiler_options=options)


def _compile_eval_step(config: Config, mesh, layout: StateLayout):
    """The float32, no-remat eval step for one chunk of validation rows."""
    eval_graphdef, _ = abstract_model(config.model, attention=config.execution.attention)
    bsh, wsh = batch_sharding(mesh), batch_sharding(mesh, 1)
    jitted = jax.jit(make_eval_step(eval_graphdef, mesh), in_shardings=(layout.param_shardings, bsh, wsh),
                     out_shardings=replicated(mesh))
    chunk = eval_chunk(config, mesh)
    rows = jax.ShapeDtypeStruct((chunk, config.data.seq_len + 1), jnp.int32, sharding=bsh)
    weights = jax.ShapeDtypeStruct((chunk,), jnp.float32, sharding=wsh)
    return jitted.lower(layout.target.params, rows, weights).compile()


def stop_ahead() -> None:
    """Cancel the ahead-of-time compiles that have not started (a sweep stopping); one in flight finishes.

    What was compiled ahead stays kept for a later sweep in this process, but may now be evicted."""
    with _lock:
        for key, entry in list(_compiled.items()):
            if entry.job is not None and entry.job.cancel():
                del _compiled[key]
            entry.taken = True
