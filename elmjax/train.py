"""Training: ``run(config)`` for the CLI, the sweep driver and the tests.

    python -m elmjax.train CONFIG.yaml [dotted.key=value ...]

A run directory (see ``elmjax.run_dir``) is resumed automatically from its
latest readable checkpoint; resuming is exact (same batches, same numbers).
SIGTERM/SIGINT save a checkpoint and stop; a non-finite loss stops the run
with status ``diverged``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from elmjax import config_io, run_dir as rd
from elmjax.checkpoint import Checkpointer
from elmjax.config import Config, identity
from elmjax.cpu_heap import keep_scratch_in_heap
from elmjax.data import batch_fingerprint, train_iterator, validation_set, vocab_size
from elmjax.distributed import maybe_initialize
from elmjax.hardware import mfu
from elmjax.layout import param_counts, train_flops_per_token
from elmjax.optim import lr_schedule, make_optimizer
from elmjax.sharding import (batch_divisor, batch_sharding, divisibility_report, format_divisibility, make_mesh,
                             param_shardings, replicated)
from elmjax.train_step import TrainState, abstract_model, init_params, make_eval_step, make_train_step, state_shardings

log = logging.getLogger("elmjax.train")



@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    state: str  # "done" | "diverged"
    final: dict | None


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT arrived; a checkpoint was saved and the run can resume."""


def setup_compilation_cache(path: str) -> None:
    if not path:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    # Cache even quick compiles: tiny sweep models recompile the same shapes
    # across seeds and resumptions.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _prepare_run_dir(config: Config) -> Path | None:
    """Check a resumed directory belongs to this config; None if already done."""
    path = Path(config.run_dir)
    saved = path / "config.yaml"
    if saved.exists():
        old = config_io.load(Config, saved)
        if identity(old) != identity(config):
            raise config_io.ConfigError(
                f"{saved}: this run directory holds a run with a different config; "
                "use another run_dir (or delete this one) to start a new run"
            )
        if rd.read_status(path)["state"] == "done" and rd.read_final(path) is not None:
            return None
    return path


def run(config: Config, *, progress_callback=None) -> RunResult:
    """Train ``config`` to completion (resuming if its run_dir has checkpoints)."""
    maybe_initialize()
    setup_compilation_cache(config.compilation_cache)
    path = _prepare_run_dir(config)
    if path is None:
        log.info("%s is already done", config.run_dir)
        return RunResult(Path(config.run_dir), "done", rd.read_final(config.run_dir))
    lead = jax.process_index() == 0
    if lead:
        path.mkdir(parents=True, exist_ok=True)
        config_io.atomic_write_text(path / "config.yaml", config_io.dump_yaml(config))
        rd.write_status(path, "running", total_steps=config.total_steps)
    try:
        with _signals_to_flag() as stop:
            return _train(config, path, stop, progress_callback)
    except Interrupted:
        raise
    except BaseException as e:
        if lead:
            err = "".join(traceback.format_exception_only(type(e), e)).strip()
            rd.write_status(path, "failed", error=err, total_steps=config.total_steps)
        raise


class _signals_to_flag:
    """Turn SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __enter__(self):
        self.event = threading.Event()
        self.signum = None
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        self.event.set()

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        return False


@dataclass
class _Session:
    """Everything compiled and placed for one run; built once by ``_setup``."""

    config: Config
    mesh: object
    state: TrainState
    start_step: int
    data_state: dict | None
    train_step: object
    eval_step: object
    batch_sharding: object
    flops_per_token: int


def _check_shapes(config: Config, mesh) -> None:
    div = batch_divisor(mesh) * config.execution.grad_accum
    if config.data.batch_size % div:
        raise config_io.ConfigError(
            f"data.batch_size ({config.data.batch_size}) must be divisible by mesh data*fsdp "
            f"({batch_divisor(mesh)}) x execution.grad_accum ({config.execution.grad_accum})"
        )
    data_vocab = vocab_size(config.data)
    if data_vocab > config.model.vocab_size:
        raise config_io.ConfigError(
            f"model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer's vocabulary ({data_vocab})"
        )


@dataclass(frozen=True)
class StateLayout:
    """How a run's train state is built and placed on ``mesh``."""

    create: object  # () -> TrainState, freshly initialised
    shardings: TrainState  # explicit NamedShardings, leaf for leaf
    target: TrainState  # ShapeDtypeStructs with those shardings: the restore target
    param_shardings: dict
    optimizer: object


def state_layout(config: Config, mesh) -> StateLayout:
    _, abs_model_state = abstract_model(config.model)
    param_sh = param_shardings(abs_model_state, mesh)
    optimizer = make_optimizer(config.optimizer, config.total_steps)
    seed = config.train.seed

    def create() -> TrainState:
        params = init_params(config.model, seed)
        rng = jax.random.key_data(jax.random.key(seed))
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)

    abstract = jax.eval_shape(create)
    shardings = state_shardings(optimizer, param_sh, abstract, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
    return StateLayout(create, shardings, target, param_sh, optimizer)


def _setup(config: Config, ckpt: Checkpointer) -> _Session:
    mesh = make_mesh(config.mesh)
    _check_shapes(config, mesh)
    replicated_dims = divisibility_report(config.model, mesh.shape)
    if replicated_dims:
        log.warning("%s", format_divisibility(replicated_dims, mesh.shape))
    total = config.total_steps
    graphdef, _ = abstract_model(config.model, **config.execution.model_kwargs)
    eval_graphdef, _ = abstract_model(config.model, attention=config.execution.attention)  # float32, no remat
    layout = state_layout(config, mesh)
    shardings, param_sh, optimizer = layout.shardings, layout.param_shardings, layout.optimizer
    restored = ckpt.restore_latest(layout.target)
    if restored is None:
        state, data_state, start = jax.jit(layout.create, out_shardings=shardings)(), None, 0
    else:
        state, data_state, start = restored
        log.info("resumed %s from step %d", config.run_dir, start)
    step_fn = make_train_step(graphdef, optimizer, lr_schedule(config.optimizer, total),
                              z_loss=config.optimizer.z_loss, grad_accum=config.execution.grad_accum, mesh=mesh)
    bsh, rep = batch_sharding(mesh), replicated(mesh)
    return _Session(
        config=config,
        mesh=mesh,
        state=state,
        start_step=start,
        data_state=data_state,
        train_step=jax.jit(step_fn, in_shardings=(shardings, bsh), out_shardings=(shardings, rep), donate_argnums=0),
        eval_step=jax.jit(make_eval_step(eval_graphdef, mesh), in_shardings=(param_sh, bsh, batch_sharding(mesh, 1)),
                          out_shardings=rep),
        batch_sharding=bsh,
        flops_per_token=train_flops_per_token(config.model, config.data.seq_len),
    )


def evaluate(session: _Session, params) -> dict:
    """Validation loss, perplexity, bits per byte and top-1 accuracy in float32."""
    val = validation_set(session.config.data)
    rows = val.tokens
    chunk = max(session.config.data.batch_size, batch_divisor(session.mesh))
    pad = (-len(rows)) % chunk
    weights = np.concatenate([np.ones(len(rows), np.float32), np.zeros(pad, np.float32)])
    rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)])
    sums = {"nll": 0.0, "correct": 0.0, "count": 0.0}
    for i in range(0, len(rows), chunk):
        batch = _global(rows[i : i + chunk], session.batch_sharding)
        w = _global(weights[i : i + chunk], batch_sharding(session.mesh, 1))
        out = jax.device_get(session.eval_step(params, batch, w))
        for k in sums:
            sums[k] += float(out[k])
    loss = sums["nll"] / sums["count"]
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 700.0)),
        "val_bpb": loss / math.log(2) / val.bytes_per_token,
        "val_acc": sums["correct"] / sums["count"],
    }


def _global(array: np.ndarray, sharding) -> jax.Array:
    """A global array from data every process holds in full."""
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def _train(config: Config, path: Path, stop, progress_callback) -> RunResult:
    lead = jax.process_index() == 0
    ckpt = Checkpointer(path, config.checkpoint)
    try:
        session = _setup(config, ckpt)
        loop = _Loop(session, path, ckpt, stop, progress_callback, lead)
        return loop.run()
    finally:
        ckpt.close()


class _Loop:
    """The step loop's bookkeeping: logging, eval, checkpoints, divergence."""

    def __init__(self, session: _Session, path: Path, ckpt: Checkpointer, stop, progress_callback, lead: bool):
        self.s, self.path, self.ckpt, self.stop, self.callback, self.lead = session, path, ckpt, stop, progress_callback, lead
        cfg = session.config
        self.cfg = cfg
        self.total = cfg.total_steps
        self.data = train_iterator(cfg.data, process_index=jax.process_index(), process_count=jax.process_count())
        self.wall_prev = 0.0
        if session.data_state is not None:
            self.data.set_state(session.data_state["iterator"])
            self.wall_prev = float(session.data_state.get("wall_time_s", 0.0))
        self.metrics = rd.MetricsLog(path, resume_step=session.start_step) if lead else None
        self.tb = _tensorboard(path) if lead else None
        self.pending: list[tuple[int, dict]] = []
        self.last_train: dict = {}
        self.t0 = time.time()
        self.window_start = (session.start_step, time.time())

    def run(self) -> RunResult:
        from tqdm.auto import tqdm

        cfg, s = self.cfg, self.s
        bar = tqdm(total=self.total, initial=s.start_step, disable=not (cfg.train.progress and self.lead),
                   desc=cfg.name or Path(cfg.run_dir).name, unit="step", dynamic_ncols=True)
        try:
            step = s.start_step
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                while step < self.total:
                    batch_np = next(self.data)
                    batch = jax.make_array_from_process_local_data(s.batch_sharding, batch_np)
                    s.state, m = s.train_step(s.state, batch)
                    step += 1
                    self.pending.append((step, m))
                    bar.update(1)
                    diverged = self._after_step(step, batch_np, bar)
                    if diverged is not None:
                        return diverged
            return self._finish(step)
        finally:
            bar.close()
            if self.metrics:
                self.metrics.close()
            if self.tb:
                self.tb.close()

    def _after_step(self, step: int, batch_np: np.ndarray, bar) -> RunResult | None:
        cfg = self.cfg
        last = step == self.total
        if step % cfg.train.log_every == 0 or last or self.stop.event.is_set() or step % cfg.checkpoint.every == 0:
            bad = self._flush_pending()
            if bad is not None:
                return self._diverged(bad)
        if step % cfg.train.log_every == 0 or last:
            self._log_train(step, batch_np, bar)
        if step % cfg.train.eval_every == 0 and not last:
            self._log_eval(step)
        if cfg.checkpoint.enabled and step % cfg.checkpoint.every == 0 and not last:
            self._save(step)
        if self.stop.event.is_set() and not last:  # at the last step, just finish
            self._save(step)
            self.ckpt.wait()
            if self.lead:
                name = signal.Signals(self.stop.signum).name
                rd.write_status(self.path, "pending", step=step, total_steps=self.total,
                                error=f"interrupted by {name} at step {step}; checkpoint saved, rerun to resume")
            raise Interrupted(f"{signal.Signals(self.stop.signum).name} at step {step}")
        return None

    def _flush_pending(self) -> int | None:
        """Fetch queued step metrics; return the first step with a non-finite loss."""
        fetched = jax.device_get([m for _, m in self.pending])
        steps = [st for st, _ in self.pending]
        self.pending.clear()
        for st, m in zip(steps, fetched):
            m = {k: float(v) for k, v in m.items()}
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                return st
            self.last_train = {"step": st, **m}
        return None

    def _diverged(self, step: int) -> RunResult:
        log.error("non-finite loss at step %d: run diverged", step)
        if self.lead:
            rd.write_status(self.path, "diverged", step=step, total_steps=self.total,
                            error=f"non-finite loss or gradient at step {step}")
        return RunResult(self.path, "diverged", None)

    def _log_train(self, step: int, batch_np: np.ndarray, bar) -> None:
        start_step, start_t = self.window_start
        now = time.time()
        tokens_per_s = (step - start_step) * self.cfg.tokens_per_step / max(now - start_t, 1e-9)
        self.window_start = (step, now)
        m = self.last_train
        row = {
            "kind": "train",
            "step": step,
            "tokens": step * self.cfg.tokens_per_step,
            "loss": m["loss"],
            "lr": m["lr"],
            "grad_norm": m["grad_norm"],
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(self.s.flops_per_token, tokens_per_s, self.s.mesh.size, self.cfg.execution.dtype),
            "batch_fingerprint": batch_fingerprint(batch_np),
            "time": now,
        }
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self._emit(row)
        if self.callback is not None:
            self.callback(step, self.total, row)

    def _log_eval(self, step: int) -> dict:
        ev = evaluate(self.s, self.s.state.params)
        self._emit({"kind": "eval", "step": step, "tokens": step * self.cfg.tokens_per_step, **ev, "time": time.time()})
        return ev

    def _emit(self, row: dict) -> None:
        if self.metrics:
            self.metrics.write(row)
        if self.tb:
            for k, v in row.items():
                if isinstance(v, float) and k not in ("time",):
                    self.tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])

    def _save(self, step: int) -> None:
        if not self.cfg.checkpoint.enabled:
            return
        state = {"iterator": self.data.get_state(), "wall_time_s": self.wall_prev + time.time() - self.t0}
        self.ckpt.save(step, self.s.state, state)

    def _finish(self, step: int) -> RunResult:
        ev = self._log_eval(step)
        self._save(step)
        self.ckpt.wait()
        counts = param_counts(self.cfg.model)
        final = {
            "step": step,
            "tokens": step * self.cfg.tokens_per_step,
            **ev,
            "train_loss": self.last_train.get("loss"),
            "wall_time_s": self.wall_prev + time.time() - self.t0,
            "params": counts.total,
            "non_embedding_params": counts.non_embedding,
            "flops_per_token": self.s.flops_per_token,
        }
        if self.lead:
            rd.write_final(self.path, final)
            rd.write_status(self.path, "done", step=step, total_steps=self.total)
            log.info("done: %s val_loss %.4f val_bpb %.4f (%d steps, %.0f s)",
                     self.path, ev["val_loss"], ev["val_bpb"], step, final["wall_time_s"])
        return RunResult(self.path, "done", final)


def _tensorboard(path: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional at run time
        return None
    return SummaryWriter(str(path / "tb"))


def restore_params(config: Config, dtype: str | None = None):
    """The model of a run directory's latest readable checkpoint (single device).

    Needs only the checkpoint: no training data, no fresh initialisation."""
    from flax import nnx

    from elmjax.checkpoint import CheckpointError
    from elmjax.config import MeshConfig

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    ckpt = Checkpointer(config.run_dir, config.checkpoint)
    try:
        restored = ckpt.restore_latest(state_layout(config, mesh).target)
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"{config.run_dir}: no checkpoint to load")
    state, _, _ = restored
    graphdef, _ = abstract_model(config.model, dtype=dtype or config.execution.dtype,
                                 attention=config.execution.attention)
    return nnx.merge(graphdef, state.params)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elmjax.train", description="Train an elmjax model.")
    parser.add_argument("config", help="training config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-3 train.steps=500")
    parser.add_argument("--coordinator", help="multi-host: coordinator HOST:PORT")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args(argv)
    keep_scratch_in_heap()  # before JAX starts its CPU client; see elmjax.cpu_heap
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = config_io.load(Config, args.config, args.overrides)
    except config_io.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    maybe_initialize(args.coordinator, args.num_processes, args.process_id)
    try:
        result = run(config)
    except Interrupted as e:
        print(f"interrupted ({e}); rerun the same command to resume", file=sys.stderr)
        return 130
    except config_io.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.state == "diverged":
        print(f"run diverged: see {result.run_dir / 'status.json'}", file=sys.stderr)
        return 1
    f = result.final
    print(f"done: {result.run_dir}  val_loss {f['val_loss']:.4f}  val_bpb {f['val_bpb']:.4f}  "
          f"val_acc {f['val_acc']:.4f}  ({f['step']} steps, {f['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
