"""Orbax checkpoints of the whole training state plus the data iterator state.

Each step directory under ``RUN_DIR/checkpoints/`` holds two items: ``state``
(params, optimizer state, step; restored onto whatever mesh the resuming run
uses; checkpoints of older versions also hold an unused ``rng``, which
restores skip) and ``data`` (the grain iterator state and the last train
metrics, as JSON).

Integrity: saves are asynchronous; orbax writes to a temporary directory and
renames it when complete. Once a save is complete, process 0 writes
``elmjax.sha256.json`` into the step directory: the SHA-256 of every file in
it (in a background thread started at the next save, or in ``wait`` and
``close``). A restore checks it first, so a flipped bit is caught instead of
silently changing the model.

Unreadable steps: a step whose checksum does not match, or whose files orbax
cannot read, is skipped with a warning in favour of the previous one; every
process skips it together. Any other error (out of memory, a sharding
mismatch) is raised as itself. When training passes an unreadable step
again, it is replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from elmjax.config import CheckpointConfig, Config, MeshConfig
from elmjax.errors import UserError
from elmjax.sharding import make_mesh, param_shardings
from elmjax.state import TrainState, abstract_model

log = logging.getLogger(__name__)

MANIFEST = "elmjax.sha256.json"


class CheckpointError(UserError):
    """A checkpoint (orbax run directory or Hugging Face directory) that cannot be used."""


class _Corrupt(Exception):
    """A checkpoint step's files do not match their recorded checksums."""


def _as_dict(state) -> dict:
    # A plain dict (not the TrainState namedtuple) keeps the on-disk layout
    # independent of our Python class names.
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _restore_args(target: dict):
    # Partial restore: the target may name a subset of what is on disk (only
    # the params for inference; no 'rng' from older checkpoints).
    return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)


# Error text of damaged files, as tensorstore/orbax/zstd report it (they
# raise plain ValueError/RuntimeError for both damage and misuse).
_DAMAGE_MARKERS = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "Error reading", "Error opening", "Error decoding",
                   "corrupt", "Corrupt", "incomplete checkpoint", "Unexpected end", "truncated", "Failed to decode",
                   "Expecting value", "Invalid manifest", "Unknown frame descriptor", "not a valid")


def _is_damage(e: BaseException) -> bool:
    """True for errors that mean the files are damaged; anything else is a real error."""
    if isinstance(e, (_Corrupt, OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError)):
        return True
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
        return False
    return isinstance(e, (ValueError, RuntimeError, KeyError)) and any(m in str(e) for m in _DAMAGE_MARKERS)


def _all(flag: bool) -> bool:
    """True on every process iff ``flag`` is true on every process."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(flag, np.int32))))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifests(directory: Path, steps: list[int]) -> None:
    for step in steps:
        d = directory / str(step)
        if not d.is_dir():  # already removed by max_to_keep
            continue
        try:
            files = {str(p.relative_to(d)): _sha256(p) for p in sorted(d.rglob("*"))
                     if p.is_file() and p.name != MANIFEST}
            # Not config_io.atomic_write: it creates missing parents, and a
            # step directory recreated after max_to_keep removed it would
            # look like a (broken) checkpoint.
            tmp = d / f".{MANIFEST}.tmp"
            tmp.write_text(json.dumps({"sha256": files}, indent=0) + "\n")
            os.replace(tmp, d / MANIFEST)
        except OSError as e:  # deleted meanwhile (max_to_keep): nothing to protect
            if d.is_dir():
                log.warning("could not write the checksums of checkpoint step %d in %s: %s", step, directory, e)


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self.unreadable: dict[int, str] = {}  # step -> why, found by restore_latest
        self._unsealed: list[int] = []  # saved, checksums not yet written
        self._hasher: threading.Thread | None = None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> None:
        # With keep=1 this save makes orbax delete the step being hashed.
        self._seal(block=self.cfg.keep == 1)
        if step in self.manager.all_steps():
            if step not in self.unreadable:
                return  # the checkpoint this run resumed from
            log.warning("replacing unreadable checkpoint step %d in %s", step, self.directory)
            self.manager.delete(step)
            del self.unreadable[step]
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(_as_dict(state)), data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args, force=force)
        self._unsealed.append(step)

    def _seal(self, *, block: bool = True) -> None:
        """Once pending saves are complete, record the checksums of their files:
        now, or (``block=False``, before the next save) in a background thread
        so hashing a large checkpoint does not hold up training."""
        self.manager.wait_until_finished()
        if self._hasher is not None:
            self._hasher.join()
            self._hasher = None
        steps, self._unsealed = self._unsealed, []
        if jax.process_index() != 0 or not steps:
            return
        if block:
            _write_manifests(self.directory, steps)
        else:
            self._hasher = threading.Thread(target=_write_manifests, args=(self.directory, steps), daemon=True)
            self._hasher.start()

    def verify(self, step: int) -> None:
        """Raise _Corrupt unless every file of ``step`` matches its checksum.

        Steps without a manifest (saved by an older version, or killed between
        completing the save and writing it) are not checked."""
        d = self.directory / str(step)
        manifest = d / MANIFEST
        if not manifest.exists():
            return
        try:
            want = json.loads(manifest.read_text())["sha256"]
        except (ValueError, KeyError, TypeError) as e:
            raise _Corrupt(f"{MANIFEST} is unreadable ({e})") from None
        for rel, digest in want.items():
            p = d / rel
            if not p.is_file():
                raise _Corrupt(f"{rel} is missing")
            if _sha256(p) != digest:
                raise _Corrupt(f"{rel} does not match its checksum")

    def restore_latest(self, abstract_state, *, params_only: bool = False):
        """(state, data_state, step) from the newest readable checkpoint, or None.

        ``abstract_state`` is a TrainState of ShapeDtypeStructs carrying the
        target shardings, so a checkpoint saved on one mesh restores onto
        another. With ``params_only`` just the parameters are read (state has
        only ``params``; data_state is None). Every process returns the same
        step."""
        tree = {"params": abstract_state.params} if params_only else _as_dict(abstract_state)
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), tree)
        items = {"state": _restore_args(target)}
        if not params_only:
            items["data"] = ocp.args.JsonRestore()
        steps = self.steps()
        for step in reversed(steps):
            restored, why = None, None
            try:
                if jax.process_index() == 0:
                    self.verify(step)
            except _Corrupt as e:
                why = str(e)
            # Checksums first, agreed by all, so no process starts a collective
            # restore that another skips.
            if _all(why is None):
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                except Exception as e:
                    if not _is_damage(e):
                        raise
                    why = f"{type(e).__name__}: {str(e)[:200]}"
            if not _all(why is None):
                why = why or "unreadable on another process"
                self.unreadable[step] = why
                log.warning("checkpoint step %d in %s is unreadable (%s); trying the previous one",
                            step, self.directory, why)
                continue
            s = restored["state"]
            if params_only:
                return TrainState(step=None, params=s["params"], opt_state=None), None, step
            data = dict(restored["data"])
            return TrainState(step=s["step"], params=s["params"], opt_state=s["opt_state"]), data, step
        if steps:
            raise CheckpointError(
                f"{self.directory}: none of the checkpoints {steps} could be restored; "
                "delete the directory to start the run afresh"
            )
        return None

    def wait(self) -> None:
        self._seal()

    def close(self) -> None:
        try:
            self._seal()
        finally:
            self.manager.close()


def load_model(path: str | Path, dtype: str | None = None, *, allow_older: bool = False):
    """An OpenELM model from a training run directory (its latest checkpoint)
    or from a Hugging Face OpenELM directory (``config.json``).

    The step loaded is logged and kept as ``model.checkpoint_step``. If the
    newest checkpoint is unreadable this raises CheckpointError, unless
    ``allow_older`` (then the newest readable one is used, with a warning)."""
    from elmjax import config_io
    from elmjax.hf_interop import from_pretrained

    path = Path(path)
    if (path / "config.json").exists():
        return from_pretrained(path, dtype=dtype or "float32")
    if path.name == "checkpoints":
        path = path.parent
    if not (path / "config.yaml").exists():
        raise CheckpointError(f"{path}: neither a run directory (config.yaml) nor a Hugging Face directory (config.json)")
    cfg = config_io.load(Config, path / "config.yaml")
    return restore_params(cfg.replace(run_dir=str(path)), dtype=dtype, allow_older=allow_older)


def restore_params(config: Config, dtype: str | None = None, *, mesh=None, allow_older: bool = False):
    """The model of a run directory's latest checkpoint, on ``mesh`` (default:
    one device). Reads only the parameters: no optimizer moments, no training
    data, no fresh initialisation."""
    from flax import nnx

    mesh = mesh or make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    _, abs_model_state = abstract_model(config.model)
    sh = param_shardings(abs_model_state, mesh)
    abs_params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                              nnx.to_pure_dict(abs_model_state), sh)
    ckpt = Checkpointer(config.run_dir, config.checkpoint)
    try:
        newest = max(ckpt.steps(), default=None)
        restored = ckpt.restore_latest(TrainState(None, abs_params, None), params_only=True)
        why = ckpt.unreadable.get(newest)
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"{config.run_dir}: no checkpoint to load")
    state, _, step = restored
    if step != newest:
        msg = (f"{config.run_dir}: the newest checkpoint (step {newest}) is unreadable ({why}); "
               f"the newest readable one is step {step}")
        if not allow_older:
            raise CheckpointError(f"{msg}. Rerun training to rewrite it, or load_model(..., allow_older=True)")
        log.warning("%s: loading step %d", msg, step)
    log.info("loaded %s step %d", config.run_dir, step)
    graphdef, _ = abstract_model(config.model, dtype=dtype or config.execution.dtype,
                                 attention=config.execution.attention)
    model = nnx.merge(graphdef, state.params)
    model.checkpoint_step = step  # which step these parameters are from
    return model
