import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from elmjax.config import MeshConfig
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig
from elmjax.sharding import MeshError, logical_to_spec, make_mesh, mesh_shape, param_shardings


def test_mesh_shape_fills_minus_one():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (MeshConfig(data=-1, fsdp=-1), "at most one axis"),
        (MeshConfig(data=-1, fsdp=3), "not divisible"),
        (MeshConfig(data=4, fsdp=4), "only 8 devices"),
        (MeshConfig(data=0), "positive or -1"),
    ],
)
def test_bad_mesh_configs(cfg, match):
    with pytest.raises(MeshError, match=match):
        mesh_shape(cfg, 8)


def test_rules_shard_heads_and_ffn_over_tensor_and_embed_over_fsdp():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert logical_to_spec(("embed", "qkv_heads", "head_dim"), (64, 8, 16), mesh) == P("fsdp", "tensor", None)
    assert logical_to_spec(("mlp", "embed"), (128, 64), mesh) == P("tensor", "fsdp")
    # 259-token vocab and 3 heads don't divide 2: replicated, still correct.
    assert logical_to_spec(("vocab", "embed"), (259, 64), mesh) == P(None, "fsdp")
    assert logical_to_spec(("q_heads", "head_dim", "embed"), (3, 16, 64), mesh) == P(None, None, "fsdp")
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("bogus",), (4,), mesh)


def test_every_model_parameter_gets_a_sharding():
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    cfg = ModelConfig(num_layers=3, model_dim=64, head_dim=16, tie_embeddings=False, vocab_size=256)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: OpenELM(cfg, rngs=nnx.Rngs(0))))
    sh = param_shardings(state, mesh)
    leaves = jax.tree.leaves(sh)
    assert len(leaves) == len(jax.tree.leaves(state))
    assert sh["embed_VD"].spec == P("tensor", "fsdp")
    assert sh["layers"][0]["ffn"]["in_DPF"].spec == P("fsdp", None, "tensor")
