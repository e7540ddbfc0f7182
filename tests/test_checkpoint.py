import logging
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from elmjax.checkpoint import Checkpointer, CheckpointError, load_model
from elmjax.hf_interop import save_pretrained
from elmjax.train import _setup, run
from train_helpers import tiny_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "run"
    cfg = tiny_config(d, "train.steps=10", "train.eval_every=100")
    run(cfg)
    return cfg


def _corrupt(step_dir):
    # Truncate every array file of the state item: what a crash mid-write of
    # a non-atomic filesystem (or a bad disk) leaves behind.
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert files
    for p in files:
        p.write_bytes(b"\0" * 7)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, finished, caplog):
    d = tmp_path / "run"
    shutil.copytree(finished.run_dir, d)
    cfg = finished.replace(run_dir=str(d))
    ckpt = Checkpointer(d, cfg.checkpoint)
    assert ckpt.steps() == [5, 10]
    _corrupt(d / "checkpoints" / "10")
    with caplog.at_level(logging.WARNING):
        session = _setup(cfg, ckpt)
    ckpt.close()
    assert session.start_step == 5
    assert "step 10" in caplog.text and "unreadable" in caplog.text
    assert int(session.state.step) == 5


def test_all_checkpoints_corrupt_is_a_clear_error(tmp_path, finished):
    d = tmp_path / "run"
    shutil.copytree(finished.run_dir, d)
    for step in (5, 10):
        _corrupt(d / "checkpoints" / str(step))
    ckpt = Checkpointer(d, finished.checkpoint)
    with pytest.raises(CheckpointError, match=r"none of the checkpoints \[5, 10\] could be restored"):
        _setup(finished.replace(run_dir=str(d)), ckpt)
    ckpt.close()


def test_restore_onto_a_different_mesh(finished):
    ckpt = Checkpointer(finished.run_dir, finished.checkpoint)
    one = _setup(finished, ckpt)
    eight = _setup(finished.replace(mesh=finished.mesh.__class__(data=2, fsdp=2, tensor=2)), ckpt)
    ckpt.close()
    assert one.start_step == eight.start_step == 10
    leaves8 = jax.tree.leaves(eight.state.params)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in leaves8)
    for a, b in zip(jax.tree.leaves(one.state), jax.tree.leaves(eight.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_model_from_run_dir_and_hf_dir(tmp_path, finished):
    model = load_model(finished.run_dir)
    tokens = jax.numpy.arange(12)[None] % 200
    out = model(tokens)
    assert out.shape == (1, 12, finished.model.vocab_size)
    save_pretrained(model, tmp_path / "hf")
    np.testing.assert_array_equal(load_model(tmp_path / "hf")(tokens), out)
    with pytest.raises(CheckpointError, match="neither a run directory"):
        load_model(tmp_path)


def test_load_model_needs_only_the_checkpoint_not_the_training_data(tmp_path):
    from elmjax.config import DataConfig
    from elmjax.data import prepare

    packed = tmp_path / "packed"
    prepare(DataConfig(seq_len=32, max_documents=60), packed, progress=False)
    d = tmp_path / "run"
    cfg = tiny_config(d, "data.source=arrayrecord", f"data.paths=[{packed}]", "train.steps=2",
                      "train.eval_every=100", "checkpoint.every=100")
    run(cfg)
    shutil.rmtree(packed)  # e.g. generating on a machine that never had the corpus
    model = load_model(d)
    assert model(jax.numpy.arange(5)[None]).shape == (1, 5, cfg.model.vocab_size)


def test_load_model_without_a_checkpoint_is_a_clear_error(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    from elmjax import config_io

    (d / "config.yaml").write_text(config_io.dump_yaml(tiny_config(d)))
    with pytest.raises(CheckpointError, match="no checkpoint to load"):
        load_model(d)


def test_checkpoint_of_an_older_version_with_an_rng_still_restores(tmp_path, finished):
    # Before TrainState lost its unused rng, checkpoints held one: they must
    # still resume (the extra item is skipped, not an "unreadable" fallback).
    import orbax.checkpoint as ocp

    from elmjax.checkpoint import _as_dict

    d = tmp_path / "run"
    shutil.copytree(finished.run_dir, d)
    cfg = finished.replace(run_dir=str(d))
    ckpt = Checkpointer(d, cfg.checkpoint)
    session = _setup(cfg, ckpt)
    ckpt.close()
    old = dict(_as_dict(session.state), rng=jax.numpy.zeros(2, jax.numpy.uint32))
    with ocp.CheckpointManager(d / "checkpoints", item_names=("state", "data")) as writer:  # as the old code saved
        writer.save(15, args=ocp.args.Composite(state=ocp.args.StandardSave(old), data=ocp.args.JsonSave({"iterator": {}})))
    ckpt = Checkpointer(d, cfg.checkpoint)
    restored = ckpt.restore_latest(session.state)
    ckpt.close()
    assert restored[2] == 15
    for a, b in zip(jax.tree.leaves(restored[0]), jax.tree.leaves(session.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_model_reads_only_the_parameters(finished, monkeypatch, caplog):
    import orbax.checkpoint as ocp

    seen = []
    restore = ocp.CheckpointManager.restore

    def spy(self, step, *args, **kwargs):
        seen.append(kwargs["args"])
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
    with caplog.at_level(logging.INFO, logger="elmjax.checkpoint"):
        model = load_model(finished.run_dir)
    assert model.checkpoint_step == 10 and "step 10" in caplog.text
    [args] = seen
    assert list(args.keys()) == ["state"]  # no data iterator state
    assert set(args["state"].item) == {"params"}  # no Adam moments, no step
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(len(x.sharding.device_set) == 1 for x in leaves)


@pytest.mark.parametrize("error", [
    jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1234 bytes"),
    ValueError("Sharding NamedSharding(mesh=..., spec=PartitionSpec('fsdp',)) is incompatible with a shape (3,)"),
])
def test_restore_errors_that_are_not_damage_are_raised_as_themselves(finished, monkeypatch, error):
    # Falling back (and finally telling the user to delete the run) would
    # hide the real problem: only damaged files make a step unreadable.
    import orbax.checkpoint as ocp

    from elmjax.config import MeshConfig
    from elmjax.sharding import make_mesh
    from elmjax.state import state_layout

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "restore", fail)
    ckpt = Checkpointer(finished.run_dir, finished.checkpoint)
    try:
        with pytest.raises(type(error), match=str(error)[:20]):
            ckpt.restore_latest(state_layout(finished, make_mesh(MeshConfig(data=1))).target)
    finally:
        ckpt.close()
    assert ckpt.unreadable == {}
