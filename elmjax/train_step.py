"""The train and eval steps: pure functions of (state, batch), jitted once.

Batches are int32 token rows [B, L+1]: inputs are [:, :-1], targets [:, 1:].
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig
from elmjax.sharding import activation_sharding, replicated


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # pure-dict NNX parameters, float32
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data; folded with the step for any stochastic op


def abstract_model(cfg: ModelConfig, **execution):
    """(graphdef, abstract state) without allocating parameters; ``execution``
    are OpenELM's dtype / remat / attention keywords."""
    return nnx.split(nnx.eval_shape(lambda: OpenELM(cfg, rngs=nnx.Rngs(0), **execution)))


def init_params(cfg: ModelConfig, seed: int) -> dict:
    return nnx.to_pure_dict(nnx.state(OpenELM(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array | None = None):
    """Mean float32 next-token cross-entropy and the mean log-partition squared."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    nll_BL = log_z_BL - target_logit_BL
    if weights_BL is None:
        return jnp.mean(nll_BL), jnp.mean(log_z_BL**2)
    denom = jnp.maximum(jnp.sum(weights_BL), 1.0)
    return jnp.sum(nll_BL * weights_BL) / denom, jnp.sum(log_z_BL**2 * weights_BL) / denom


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    *, z_loss: float, grad_accum: int, mesh=None) -> Callable:
    """The jittable step. With ``mesh``, activations are pinned to it (see
    ``elmjax.sharding``), which is what keeps FSDP's memory and traffic low."""

    def loss_fn(params, tokens_BL1):
        with activation_sharding(mesh):
            logits = nnx.merge(graphdef, params)(tokens_BL1[:, :-1])
        ce, z2 = cross_entropy(logits, tokens_BL1[:, 1:])
        return ce + z_loss * z2, ce

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch_BL1: jax.Array):
        if grad_accum == 1:
            (_, ce), grads = grad_fn(state.params, batch_BL1)
        else:
            # Micro-batch m takes rows m, m+A, m+2A, ...: each device keeps
            # rows it already holds, and equal-size micro-batches make the
            # mean of means the full-batch mean.
            micro_ABL1 = batch_BL1.reshape(-1, grad_accum, batch_BL1.shape[-1]).swapaxes(0, 1)

            def accumulate(carry, micro_BL1):
                (_, ce_m), g = grad_fn(state.params, micro_BL1)
                return jax.tree.map(jnp.add, carry, (g, ce_m)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32))
            (grads, ce), _ = jax.lax.scan(accumulate, zeros, micro_ABL1)
            grads, ce = jax.tree.map(lambda g: g / grad_accum, (grads, ce))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": ce, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return train_step


def make_eval_step(graphdef, mesh=None) -> Callable:
    """Sums of float32 NLL, correct top-1 predictions and counted tokens."""

    def eval_step(params, batch_BL1: jax.Array, row_weights_B: jax.Array):
        with activation_sharding(mesh):
            logits = nnx.merge(graphdef, params)(batch_BL1[:, :-1]).astype(jnp.float32)
        targets = batch_BL1[:, 1:]
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        w = jnp.broadcast_to(row_weights_B[:, None], nll.shape)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return {"nll": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "count": jnp.sum(w)}

    return eval_step


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
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)
