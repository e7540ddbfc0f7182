"""Orbax checkpoints of the whole training state plus the data iterator state.

Each step directory under ``RUN_DIR/checkpoints/`` holds two items: ``state``
(params, optimizer state, step; restored onto whatever mesh the
resuming run uses; checkpoints of older versions also hold an unused ``rng``,
which restores skip) and ``data`` (the grain iterator state as JSON). Saves are
asynchronous; orbax writes to a temporary directory and renames it when
complete, and a latest checkpoint that still fails to restore (corrupt files)
is skipped with a warning in favour of the previous one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from elmjax.config import CheckpointConfig, Config, MeshConfig
from elmjax.sharding import make_mesh
from elmjax.state import TrainState, abstract_model, state_layout

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint (orbax run directory or Hugging Face directory) that cannot be used."""


def _as_dict(state) -> dict:
    # A plain dict (not the TrainState namedtuple) keeps the on-disk layout
    # independent of our Python class names.
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _restore_args(target: dict):
    # Partial restore: the target may name a subset of what is on disk (only
    # the params for inference; no 'rng' from older checkpoints).
    return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)


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

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> None:
        if step in self.manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(_as_dict(state)), data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args, force=force)

    def restore_latest(self, abstract_state):
        """(state, data_state, step) from the newest readable checkpoint, or None.

        ``abstract_state`` is a TrainState of ShapeDtypeStructs carrying the
        target shardings, so a checkpoint saved on one mesh restores onto
        another."""
        target = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), _as_dict(abstract_state)
        )
        steps = self.steps()
        for step in reversed(steps):
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=_restore_args(target), data=ocp.args.JsonRestore())
                )
            except Exception as e:  # orbax raises many types for torn files
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, str(e)[:200])
                continue
            s = restored["state"]
            state = TrainState(step=s["step"], params=s["params"], opt_state=s["opt_state"])
            return state, dict(restored["data"]), step
        if steps:
            raise CheckpointError(
                f"{self.directory}: none of the checkpoints {steps} could be restored; "
                "delete the directory to start the run afresh"
            )
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def load_model(path: str | Path, dtype: str | None = None):
    """An OpenELM model from a training run directory (its latest readable
    checkpoint) or from a Hugging Face OpenELM directory (``config.json``)."""
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
    return restore_params(cfg.replace(run_dir=str(path)), dtype=dtype)


def restore_params(config: Config, dtype: str | None = None):
    """The model of a run directory's latest readable checkpoint (single device).

    Needs only the checkpoint: no training data, no fresh initialisation."""
    from flax import nnx

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    ckpt = Checkpointer(config.run_dir, config.checkpoint)
    try:
        restored = ckpt.restore_latest(state_layout(config, mesh).target)
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"{config.run_dir}: no checkpoint to load")
    state, _, _ = restored
    graphdef, _ = abstract_model(config.model.replace(dtype=dtype) if dtype else config.model)
    return nnx.merge(graphdef, state.params)
