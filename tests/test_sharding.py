import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from elmjax.config import MeshConfig
from elmjax.model import OpenELM
from elmjax.layout import layer_layout
from elmjax.model_config import ModelConfig, preset
from elmjax.sharding import (MeshError, activation_sharding, batch_divisor, batch_sharding, constrain, device_grid,
                             divisibility_report, format_divisibility, logical_to_spec, make_mesh, mesh_shape,
                             param_shardings)


def test_mesh_shape_fills_minus_one():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (1, 2, 2, 2)
    assert mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 1, 8, 1)
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, dcn_data=2), 8) == (2, 2, 2, 1)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (MeshConfig(data=-1, fsdp=-1), "at most one axis"),
        (MeshConfig(data=-1, fsdp=3), "not divisible"),
        (MeshConfig(data=4, fsdp=4), "only 8 devices"),
        (MeshConfig(data=2, fsdp=2, dcn_data=4), "only 8 devices"),
        (MeshConfig(data=0), "positive or -1"),
    ],
)
def test_bad_mesh_configs(cfg, match):
    with pytest.raises(MeshError, match=match):
        mesh_shape(cfg, 8)


def test_rules_shard_heads_and_ffn_over_tensor_and_embed_over_fsdp():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert logical_to_spec(("embed", "kv_heads", None, "head_dim"), (64, 4, 4, 16), mesh) == P("fsdp", "tensor", None, None)
    assert logical_to_spec(("mlp", "embed"), (128, 64), mesh) == P("tensor", "fsdp")
    # 259-token vocab and 3 kv heads don't divide 2: replicated, still correct.
    assert logical_to_spec(("vocab", "embed"), (259, 64), mesh) == P(None, "fsdp")
    assert logical_to_spec(("kv_heads", None, "head_dim", "embed"), (3, 2, 16, 64), mesh) == P(None, None, None, "fsdp")
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("bogus",), (4,), mesh)


def test_activation_rules_use_each_mesh_axis_once():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    # The batch takes (data, fsdp), so the activation's embed dim stays whole
    # while a parameter's embed dim is split over fsdp: same table, one rule.
    assert logical_to_spec(("batch", "length", "embed"), (16, 32, 64), sizes) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("batch", "length", "vocab"), (16, 32, 256), sizes) == P(("data", "fsdp"), None, "tensor")
    assert logical_to_spec(("batch", "length", "heads", "head_dim"), (16, 32, 4, 8), sizes) == P(("data", "fsdp"), None, "tensor", None)
    # A batch of 2 rows can't be split 8 ways: replicated, and fsdp is then free for embed.
    assert logical_to_spec(("batch", "length", "embed"), (2, 32, 64), sizes) == P(None, None, "fsdp")
    # Size-1 mesh axes are left out of specs.
    assert logical_to_spec(("batch", "embed"), (8, 64), {"data": 1, "fsdp": 8, "tensor": 1}) == P("fsdp", None)


def test_constrain_is_a_no_op_outside_a_sharded_step_and_pins_inside():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    x = jnp.ones((8, 4, 16))
    assert "sharding_constraint" not in str(jax.make_jaxpr(lambda a: constrain(a, ("batch", "length", "embed")))(x))

    def pinned(a):
        with activation_sharding(mesh):
            return constrain(a * 2, ("batch", "length", "embed"))

    jaxpr = str(jax.make_jaxpr(pinned)(x))
    assert "sharding_constraint" in jaxpr
    out = jax.jit(pinned)(x)
    assert out.sharding.spec == P(("data", "fsdp"))


def test_every_model_parameter_gets_a_sharding():
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    cfg = ModelConfig(num_layers=3, model_dim=64, head_dim=16, tie_embeddings=False, vocab_size=256)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: OpenELM(cfg, rngs=nnx.Rngs(0))))
    sh = param_shardings(state, mesh)
    leaves = jax.tree.leaves(sh)
    assert len(leaves) == len(jax.tree.leaves(state))
    assert sh["embed_VD"].spec == P("tensor", "fsdp")
    assert sh["layers"][0]["ffn"]["in_DPF"].spec == P("fsdp", None, "tensor")


class _SliceDevice:
    """A real CPU device that claims to sit on TPU slice ``slice_index``."""

    def __init__(self, device, slice_index):
        self._device, self.slice_index = device, slice_index

    def __getattr__(self, name):
        return getattr(self._device, name)


def test_dcn_data_is_the_outer_batch_axis_on_one_host():
    mesh = make_mesh(MeshConfig(dcn_data=2, data=-1, fsdp=2))
    assert dict(mesh.shape) == {"dcn_data": 2, "data": 2, "fsdp": 2, "tensor": 1}
    assert batch_divisor(mesh) == 8
    assert batch_sharding(mesh).spec == P(("dcn_data", "data", "fsdp"), None)


def test_multi_slice_devices_are_grouped_by_slice_along_dcn_data():
    devices = [_SliceDevice(d, i // 4) for i, d in enumerate(jax.devices())]
    grid = device_grid(MeshConfig(dcn_data=2, data=1, fsdp=-1), devices)
    assert grid.shape == (2, 1, 4, 1)
    assert [{d.slice_index for d in row.flat} for row in grid] == [{0}, {1}]
    with pytest.raises(MeshError, match=r"span 2 slices; set mesh.dcn_data=2"):
        device_grid(MeshConfig(data=-1), devices)


def test_a_partial_mesh_is_an_error_on_several_hosts_but_not_on_one():
    small = MeshConfig(data=2)
    assert device_grid(small, jax.devices(), process_count=1).size == 2
    with pytest.raises(MeshError, match=r"covers 2 of 8 devices on 2 processes"):
        device_grid(small, jax.devices(), process_count=2)


def test_divisibility_report_names_layers_and_bytes_and_head_multiple_clears_it():
    cfg = preset("OpenELM-270M")
    mesh = {"dcn_data": 1, "data": 1, "fsdp": 8, "tensor": 2}
    report = divisibility_report(cfg, mesh)
    odd = [i for i, lay in enumerate(layer_layout(cfg)) if lay.kv_heads % 2]
    assert odd == [0, 1, 2, 3, 4, 12, 13, 14, 15]  # kv heads 3 and 5
    assert sorted({r.param for r in report}) == sorted(f"layers/{i}/attn/{w}" for i in odd for w in ("qkv_DKCE", "out_KGED"))
    qkv0 = next(r for r in report if r.param == "layers/0/attn/qkv_DKCE")
    assert (qkv0.axis, qkv0.size, qkv0.mesh_axes) == ("kv_heads", 3, ("tensor",))
    # [1280, 3, 4 + 2, 64] float32 split 8 ways instead of 16.
    assert qkv0.extra_bytes == 1280 * 3 * 6 * 64 * 4 // 8 - 1280 * 3 * 6 * 64 * 4 // 16
    text = format_divisibility(report, mesh)
    assert "layers/12/attn/qkv_DKCE: kv_heads=5 not divisible by tensor=2" in text and "model.head_multiple=2" in text
    rounded = cfg.replace(head_multiple=2)
    assert divisibility_report(rounded, mesh) == []
    assert all(lay.kv_heads % 2 == 0 for lay in layer_layout(rounded))
    assert divisibility_report(cfg, {"data": 8, "fsdp": 1, "tensor": 1}) == []
