"""The train and eval steps: pure functions of (state, batch), jitted once.

Batches are int32 token rows [B, L+1]: inputs are [:, :-1], targets [:, 1:].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from elmjax.loss import chunked_cross_entropy, cross_entropy
from elmjax.sharding import activation_sharding
from elmjax.state import TrainState


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    *, z_loss: float, grad_accum: int, mesh=None, loss_chunk: int = 0) -> Callable:
    """The jittable step. With ``mesh``, activations are pinned to it (see
    ``elmjax.sharding``), which is what keeps FSDP's memory and traffic low.
    ``loss_chunk`` > 0 computes the loss that many positions at a time
    (``elmjax.loss.chunked_cross_entropy``); 0 materialises all logits."""

    def loss_fn(params, tokens_BL1):
        model = nnx.merge(graphdef, params)
        with activation_sharding(mesh):
            if loss_chunk > 0:
                ce, z2 = chunked_cross_entropy(model.logits, model.hidden(tokens_BL1[:, :-1]), tokens_BL1[:, 1:],
                                               loss_chunk)
            else:
                ce, z2 = cross_entropy(model(tokens_BL1[:, :-1]), tokens_BL1[:, 1:])
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
        return TrainState(state.step + 1, params, opt_state), metrics

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
