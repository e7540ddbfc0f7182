"""The train state: what it holds, how it is built, and where it lives on a mesh.

One place for the layout that training, benchmarks and checkpoint restores
share, so a restore target always matches what training saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from elmjax.config import Config, OptimizerConfig
from elmjax.init_draws import drawn_in_batch
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig
from elmjax.mup import lr_multipliers
from elmjax.optim import make_optimizer
from elmjax.sharding import param_shardings, replicated


class TrainState(NamedTuple):
    # No RNG: nothing in training is stochastic (no dropout); batches come
    # from the data seed and initialisation from train.seed.
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # pure-dict NNX parameters, float32
    opt_state: optax.OptState


def abstract_model(cfg: ModelConfig, **execution):
    """(graphdef, abstract state) without allocating parameters; ``execution``
    are OpenELM's dtype / remat / attention keywords."""
    return nnx.split(nnx.eval_shape(lambda: OpenELM(cfg, rngs=nnx.Rngs(0), **execution)))


def init_params(cfg: ModelConfig, seed) -> dict:
    """Fresh parameters; ``seed`` is an int or an int32 scalar (traced under jit)."""
    key = jax.random.key(seed)  # what nnx.Rngs(seed) makes of an int

    def build():
        return OpenELM(cfg, rngs=nnx.Rngs(key))

    # The same values as drawing each parameter from its own key, in one batch (elmjax.init_draws).
    with drawn_in_batch(build, key):
        model = build()
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_optimizer(model: ModelConfig, optimizer: OptimizerConfig, total_steps: int,
                    abstract_params: dict) -> optax.GradientTransformation:
    """The optimizer that trains ``model`` (abstract params from ``abstract_model``): muP's per-matrix lr
    multipliers included. Training and the benchmark both build theirs here."""
    return make_optimizer(optimizer, total_steps, lr_multipliers(model, abstract_params))


def state_shardings(optimizer, param_sh: dict, abstract_state: TrainState, mesh) -> TrainState:
    """Explicit shardings: optimizer moments follow their parameters."""
    rep = replicated(mesh)
    opt_sh = optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, sh: sh,
        abstract_state.opt_state,
        param_sh,
        transform_non_params=lambda _: rep,
    )
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh)


@dataclass(frozen=True)
class StateLayout:
    """How a run's train state is built and placed on ``mesh``."""

    create: object  # (seed=train.seed) -> TrainState, freshly initialised
    shardings: TrainState  # explicit NamedShardings, leaf for leaf
    target: TrainState  # ShapeDtypeStructs with those shardings: the restore target
    param_shardings: dict
    optimizer: object


def state_layout(config: Config, mesh) -> StateLayout:
    _, abs_model_state = abstract_model(config.model)
    param_sh = param_shardings(abs_model_state, mesh)
    optimizer = model_optimizer(config.model, config.optimizer, config.total_steps, nnx.to_pure_dict(abs_model_state))
    seed = config.train.seed

    def create(seed=seed) -> TrainState:
        # Jit it with the seed as an argument (``jax.jit(create)(np.int32(seed))``):
        # as a closed-over int it is folded into the program, and every seed
        # compiles (and caches) a program of its own.
        params = init_params(config.model, seed)
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    abstract = jax.eval_shape(create)
    shardings = state_shardings(optimizer, param_sh, abstract, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
    return StateLayout(create, shardings, target, param_sh, optimizer)
