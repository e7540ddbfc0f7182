"""Training: ``run(config)`` for the CLI, the sweep driver and the tests.

    python -m elmjax.train CONFIG.yaml [dotted.key=value ...]

A run directory (see ``elmjax.run_dir``) is resumed automatically from its
latest readable checkpoint; resuming is exact (same batches, same numbers).
SIGTERM/SIGINT save a checkpoint and stop; a non-finite loss stops the run
with status ``diverged``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
import numpy as np

from elmjax import config_io, run_dir as rd, tb_log
from elmjax.checkpoint import Checkpointer
from elmjax.cli import cli_logging, run_exit, user_error_exit
from elmjax.config import Config, identity
from elmjax.cpu_heap import keep_scratch_in_heap
from elmjax.data import batch_fingerprint, test_set, tokenizer_spec, train_iterator, validation_set, vocab_size
from elmjax.distributed import StopAgreement, maybe_initialize
from elmjax.errors import UserError
from elmjax.hardware import mfu
from elmjax.layout import param_counts, train_flops_per_token
from elmjax.programs import compiled_programs
from elmjax.run_times import RunTimes
from elmjax.sharding import (batch_divisor, batch_sharding, divisibility_report, format_divisibility, global_array,
                             make_mesh)
from elmjax.state import TrainState, state_layout
from elmjax.train_program import check_batch

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


def _prepare_run_dir(config: Config, identity_fn=identity) -> Path | None:
    """Check a resumed directory belongs to this config; None if already done.
    (``identity_fn``: what identifies a run of ``config``'s class; fine-tuning
    passes its own.)

    A directory whose earlier attempt never saved a checkpoint (e.g. it failed
    during setup) holds nothing to resume, so a corrected config replaces its
    config.yaml instead of being refused."""
    path = Path(config.run_dir)
    if path.exists() and not path.is_dir():
        raise config_io.ConfigError(f"run_dir: {path} is a file, not a directory")
    saved = path / "config.yaml"
    if saved.exists():
        old = config_io.load(type(config), saved)
        if identity_fn(old) != identity_fn(config):
            changed = config_io.differences(identity_fn(old), identity_fn(config))
            if _has_checkpoint(path) or rd.read_final(path) is not None:
                raise config_io.ConfigError(
                    f"{saved}: this run directory holds a run with a different config ({changed}); "
                    "use another run_dir (or delete this one) to start a new run"
                )
            log.warning("%s: replacing the config of an attempt that saved no checkpoint (%s)", path, changed)
        elif rd.read_status(path)["state"] == "done" and rd.read_final(path) is not None:
            return None
    return path


def _has_checkpoint(path: Path) -> bool:
    """Any checkpoint step on disk, finished or not (orbax names step directories by number)."""
    root = path / "checkpoints"
    return root.is_dir() and any(p.name.split(".")[0].isdigit() for p in root.iterdir())


def run(config: Config, *, progress_callback=None) -> RunResult:
    """Train ``config`` to completion (resuming if its run_dir has checkpoints)."""
    maybe_initialize()
    setup_compilation_cache(config.compilation_cache)
    used = tokenizer_spec(config.data)
    if used != config.data.tokenizer:
        # Prepared data is already tokenized: record the tokenizer it was made
        # with, so generate/evaluate on this run decode with the right one.
        config = config.replace(data=dataclasses.replace(config.data, tokenizer=used))
    path = _prepare_run_dir(config)
    if path is None:
        log.info("%s is already done", config.run_dir)
        return RunResult(Path(config.run_dir), "done", rd.read_final(config.run_dir))
    times = RunTimes()
    lead = jax.process_index() == 0
    if lead:
        path.mkdir(parents=True, exist_ok=True)
        config_io.atomic_write_text(path / "config.yaml", config_io.dump_yaml(config))
        rd.write_status(path, "running", total_steps=config.total_steps)
    try:
        with _signals_to_flag() as stop:
            return _train(config, path, stop, progress_callback, times)
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
    eval_chunk: int
    batch_sharding: object
    flops_per_token: int
    times: RunTimes


def _check_shapes(config: Config, mesh) -> None:
    # Open the data first (tokenized once and cached for the loop): a wrong
    # path, field or empty corpus fails in seconds, before any compilation.
    train_iterator(config.data, process_index=jax.process_index(), process_count=jax.process_count())
    validation_set(config.data)
    test_set(config.data)  # a test split the held-out data cannot fill fails now, not after training
    check_batch(config, mesh)
    data_vocab = vocab_size(config.data)
    if data_vocab > config.model.vocab_size:
        raise config_io.ConfigError(
            f"model.vocab_size ({config.model.vocab_size}) is smaller than the vocabulary of tokenizer "
            f"'{config.data.tokenizer}' ({data_vocab}); set model.vocab_size={data_vocab} (or more)"
        )


def _setup(config: Config, ckpt: Checkpointer, times: RunTimes | None = None) -> _Session:
    times = times or RunTimes()
    mesh = make_mesh(config.mesh)
    _check_shapes(config, mesh)
    replicated_dims = divisibility_report(config.model, mesh.shape)
    if replicated_dims:
        log.warning("%s", format_divisibility(replicated_dims, mesh.shape))
    layout = state_layout(config, mesh)
    with times.measure("checkpoint"):
        restored = ckpt.restore_latest(layout.target)
    with times.measure("compile"):
        # Compiled here, ahead of the loop, so compile_s is compiling alone
        # (or nothing, when the last run of this process had the same shapes).
        programs = compiled_programs(config, mesh, layout)
        if restored is None:
            state, data_state, start = programs.init_state(config.train.seed), None, 0
    if restored is not None:
        state, data_state, start = restored
        log.info("resumed %s from step %d", config.run_dir, start)
    return _Session(
        config=config,
        mesh=mesh,
        state=state,
        start_step=start,
        data_state=data_state,
        train_step=programs.train_step,
        eval_step=programs.eval_step,
        eval_chunk=programs.eval_chunk,
        batch_sharding=batch_sharding(mesh),
        flops_per_token=train_flops_per_token(config.model, config.data.seq_len),
        times=times,
    )


def evaluate(session: _Session, params, held=None, prefix: str = "val") -> dict:
    """Loss, perplexity, bits per byte and top-1 accuracy in float32 on ``held`` (default: the validation set)."""
    val = validation_set(session.config.data) if held is None else held
    rows = val.tokens
    chunk = session.eval_chunk
    pad = (-len(rows)) % chunk
    weights = np.concatenate([np.ones(len(rows), np.float32), np.zeros(pad, np.float32)])
    rows = np.concatenate([rows, np.zeros((pad, *rows.shape[1:]), rows.dtype)])
    sums = {"nll": 0.0, "correct": 0.0, "count": 0.0}
    for i in range(0, len(rows), chunk):
        batch = global_array(rows[i : i + chunk], session.batch_sharding)
        w = global_array(weights[i : i + chunk], batch_sharding(session.mesh, 1))
        out = jax.device_get(session.eval_step(params, batch, w))
        for k in sums:
            sums[k] += float(out[k])
    loss = sums["nll"] / sums["count"]
    return {
        f"{prefix}_loss": loss,
        f"{prefix}_ppl": math.exp(min(loss, 700.0)),
        f"{prefix}_bpb": loss / math.log(2) / val.bytes_per_token,
        f"{prefix}_acc": sums["correct"] / sums["count"],
    }


def held_out_final(session: _Session, params) -> dict:
    """Test metrics (scored once, at the end) and the fingerprints of both held-out splits for final.json.

    Sweeps check that every run saw the same splits through these fingerprints.
    """
    data = session.config.data
    out = {"val_fingerprint": batch_fingerprint(validation_set(data).tokens)}
    test = test_set(data)
    if test is not None:
        out.update(evaluate(session, params, test, "test"), test_fingerprint=batch_fingerprint(test.tokens))
    return out


def _train(config: Config, path: Path, stop, progress_callback, times: RunTimes) -> RunResult:
    lead = jax.process_index() == 0
    with times.measure("checkpoint"):
        ckpt = Checkpointer(path, config.checkpoint)
    try:
        session = _setup(config, ckpt, times)
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
        self.data = self._open_data()
        self.times = session.times
        if session.data_state is not None:
            self.data.set_state(session.data_state["iterator"])
            # Checkpoints of older versions hold only wall_time_s.
            self.times.resume(session.data_state.get("times", session.data_state))
        self.metrics = rd.MetricsLog(path, resume_step=session.start_step) if lead else None
        self.pending: list[tuple[int, dict]] = []
        # The last fetched train metrics travel in the checkpoint, so a run
        # resumed at its final step still reports its final train loss.
        self.last_train: dict = dict(session.data_state.get("last_train", {})) if session.data_state else {}
        self.tb = tb_log.open_writer(path, resume_step=session.start_step) if lead else None
        # Resumed from the final checkpoint (killed before final.json): the
        # final eval row is already in metrics.jsonl and must not be repeated.
        self.final_eval_logged = lead and session.start_step == self.total and any(
            r.get("kind") == "eval" and r.get("step") == self.total for r in rd.read_metrics(path))
        self.agree = StopAgreement()
        self.stopping = False
        self.window_start = (session.start_step, time.time())

    def _open_data(self):
        """The training batch iterator (fine-tuning overrides it for chat data)."""
        return train_iterator(self.cfg.data, process_index=jax.process_index(), process_count=jax.process_count())

    def _final_extra(self, step: int) -> dict:
        """More final.json fields: the held-out test split (fine-tuning adds adapter counts and task scores instead)."""
        return held_out_final(self.s, self.s.state.params)

    def run(self) -> RunResult:
        from tqdm.auto import tqdm

        cfg, s = self.cfg, self.s
        bar = tqdm(total=self.total, initial=s.start_step, disable=not (cfg.train.progress and self.lead),
                   desc=cfg.name or Path(cfg.run_dir).name, unit="step", dynamic_ncols=True)
        try:
            step = s.start_step
            with warnings.catch_warnings(), self.times.measure("train"):
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
        self.stopping = self.agree(self.stop.event.is_set())
        if step % cfg.train.log_every == 0 or last or self.stopping or step % cfg.checkpoint.every == 0:
            bad = self._flush_pending()
            if bad is not None:
                return self._diverged(bad)
        if step % cfg.train.log_every == 0 or last:
            self._log_train(step, batch_np, bar)
        if step % cfg.train.eval_every == 0 and not last:
            self._log_eval(step)
        if cfg.checkpoint.enabled and step % cfg.checkpoint.every == 0 and not last:
            self._save(step)
        if self.stopping and not last:  # at the last step, just finish
            self._save(step)
            with self.times.measure("checkpoint"):
                self.ckpt.wait()
            name = signal.Signals(self.stop.signum).name if self.stop.signum else "a signal to another process"
            if self.lead:
                rd.write_status(self.path, "pending", step=step, total_steps=self.total,
                                error=f"interrupted by {name} at step {step}; checkpoint saved, rerun to resume")
            raise Interrupted(f"{name} at step {step}")
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
        if self.lead:
            rd.write_status(self.path, "running", step=step, total_steps=self.total)
        if self.callback is not None:
            self.callback(step, self.total, row)

    def _log_eval(self, step: int, emit: bool = True) -> dict:
        jax.block_until_ready(self.s.state)  # the steps dispatched so far are train time, not eval time
        with self.times.measure("eval"):
            ev = evaluate(self.s, self.s.state.params)
        if emit:
            self._emit({"kind": "eval", "step": step, "tokens": step * self.cfg.tokens_per_step, **ev, "time": time.time()})
        return ev

    def _emit(self, row: dict) -> None:
        if self.metrics:
            self.metrics.write(row)
        if self.tb:
            for k, v in row.items():
                if isinstance(v, float) and k not in ("time",):
                    self.tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])
            self.tb.flush()  # with each metrics line: a kill loses no more than metrics.jsonl does

    def _save(self, step: int) -> None:
        if not self.cfg.checkpoint.enabled:
            return
        jax.block_until_ready(self.s.state)  # the steps dispatched so far are train time
        with self.times.measure("checkpoint"):
            record = self.times.record()
            # wall_time_s stays at the top level too: older versions resume from it.
            state = {"iterator": self.data.get_state(), "wall_time_s": record["wall_time_s"], "times": record,
                     "last_train": self.last_train}
            self.ckpt.save(step, self.s.state, state)

    def _finish(self, step: int) -> RunResult:
        ev = self._log_eval(step, emit=not self.final_eval_logged)
        self._save(step)
        with self.times.measure("checkpoint"):
            self.ckpt.wait()
        # Before the times are read: scoring the test split (fine-tuning: saving adapters, task scores) is
        # part of the run, counted as eval time. It used to fall outside wall_time_s (1-2.6 s a run for
        # the CPU study's 2048 test rows).
        with self.times.measure("eval"):
            extra = self._final_extra(step)
        counts = param_counts(self.cfg.model)
        times = self.times.record()
        final = {
            "step": step,
            "tokens": step * self.cfg.tokens_per_step,
            **ev,
            "train_loss": self.last_train.get("loss"),
            **times,  # wall_time_s and where it went (elmjax.run_times)
            "params": counts.total,
            "non_embedding_params": counts.non_embedding,
            "flops_per_token": self.s.flops_per_token,
            **extra,
        }
        if self.lead:
            rd.write_final(self.path, final)
            rd.write_status(self.path, "done", step=step, total_steps=self.total)
            log.info("done: %s val_loss %.4f val_bpb %.4f (%d steps, %.0f s)",
                     self.path, ev["val_loss"], ev["val_bpb"], step, final["wall_time_s"])
        return RunResult(self.path, "done", final)


def _log_progress(step: int, total: int, row: dict) -> None:
    log.info("step %d/%d  loss %.4f  lr %.3g  %.0f tokens/s", step, total, row["loss"], row["lr"], row["tokens_per_s"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elmjax.train", description="Train an elmjax model.")
    parser.add_argument("config", help="training config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-3 train.steps=500")
    parser.add_argument("--coordinator", help="multi-host: coordinator HOST:PORT")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = parser.parse_args(argv)
    keep_scratch_in_heap()  # before JAX starts its CPU client; see elmjax.cpu_heap
    try:
        with cli_logging():
            config = config_io.load(Config, args.config, args.overrides)
            maybe_initialize(args.coordinator, args.num_processes, args.process_id)
            callback = None
            if config.train.progress and not sys.stderr.isatty():
                # A progress bar in a file (SLURM logs, pipes) is kilobytes of
                # carriage returns: log plain lines at each log step instead.
                config = config.replace(train=dataclasses.replace(config.train, progress=False))
                callback = _log_progress
            result = run(config, progress_callback=callback)
    except Interrupted as e:
        print(f"interrupted ({e}); rerun the same command to resume", file=sys.stderr)
        return 130
    except UserError as e:
        # A mistake in the config, data, tokenizer or mesh: one line naming
        # the key or file. Anything else is a bug and keeps its traceback.
        return user_error_exit(e, args.debug)
    return run_exit(result, lambda f: f"done: {result.run_dir}  val_loss {f['val_loss']:.4f}  val_bpb {f['val_bpb']:.4f}  "
                                      f"val_acc {f['val_acc']:.4f}  ({f['step']} steps, {f['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
