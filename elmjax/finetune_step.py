"""The fine-tuning step: gradients and optimizer updates for the adapters only.

``state.params`` are the adapters (``elmjax.peft``); the frozen base weights
are a separate, non-donated argument, so nothing about them is differentiated
or stored in the optimizer. Batches are either token rows [B, L+1] (plain
text, as in training) or packed chat rows [B, 4, L+1] (``elmjax.sft_data``:
tokens, loss weights, segment ids, positions), where only weighted target
tokens count and packed examples never attend to each other.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from elmjax import peft
from elmjax.loss import cross_entropy
from elmjax.peft import PeftConfig
from elmjax.sharding import activation_sharding
from elmjax.state import TrainState


def _inputs(batch):
    """(tokens, targets, weights, segments, positions) of either batch format."""
    if batch.ndim == 2:
        return batch[:, :-1], batch[:, 1:], None, None, None
    tokens = batch[:, 0]
    # Weight of predicting token t+1 sits on token t+1 (it is that token's
    # role); segment/position belong to the inputs.
    return tokens[:, :-1], tokens[:, 1:], batch[:, 1, 1:].astype(jnp.float32), batch[:, 2, :-1], batch[:, 3, :-1]


def batch_logits(graphdef, params, batch):
    tokens, targets, weights, segments, positions = _inputs(batch)
    logits = nnx.merge(graphdef, params)(tokens, positions, segment_ids=segments)
    return logits, targets, weights


def make_finetune_step(graphdef, peft_cfg: PeftConfig, optimizer: optax.GradientTransformation,
                       schedule: optax.Schedule, *, z_loss: float, mesh=None) -> Callable:
    """step(state, base, batch) -> (state, metrics)."""

    def loss_fn(adapters, base, batch, step):
        params = peft.effective_params(base, adapters, peft_cfg, step=step)
        with activation_sharding(mesh):
            logits, targets, weights = batch_logits(graphdef, params, batch)
        ce, z2 = cross_entropy(logits, targets, weights)
        return ce + z_loss * z2, ce

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state: TrainState, base: dict, batch):
        (_, ce), grads = grad_fn(state.params, base, batch, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": ce, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step_fn


def make_finetune_eval_step(graphdef, peft_cfg: PeftConfig, mesh=None) -> Callable:
    """eval(adapters, base, batch, row_weights) -> sums of NLL, correct and counted tokens."""

    def eval_step(adapters, base, batch, row_weights_B):
        params = peft.effective_params(base, adapters, peft_cfg)
        with activation_sharding(mesh):
            logits, targets, weights = batch_logits(graphdef, params, batch)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        w = jnp.broadcast_to(row_weights_B[:, None], nll.shape)
        if weights is not None:
            w = w * weights
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return {"nll": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "count": jnp.sum(w)}

    return eval_step
