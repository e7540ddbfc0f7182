"""The train step as training jits it: one place for its shardings and donation.

``elmjax.train`` runs what ``jit_train_step`` returns, and
``elmjax.preflight`` AOT-compiles the same function from abstract inputs, so
the memory and collectives preflight reports are those of the real step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elmjax.config import Config
from elmjax.config_io import ConfigError
from elmjax.optim import lr_schedule
from elmjax.sharding import batch_divisor, batch_sharding, replicated
from elmjax.state import abstract_model
from elmjax.train_step import make_train_step


def check_batch(config: Config, mesh) -> None:
    """The global batch must split evenly over data*fsdp devices and micro-batches."""
    accum = config.execution.grad_accum
    div = batch_divisor(mesh) * accum
    if config.data.batch_size % div:
        raise ConfigError(
            f"data.batch_size ({config.data.batch_size}) must be divisible by mesh data*fsdp "
            f"({batch_divisor(mesh)}) x execution.grad_accum ({accum})"
        )


def jit_train_step(config: Config, mesh, layout):
    """The jitted train step for ``layout`` (a ``state_layout``): state in, state out (donated), metrics replicated."""
    graphdef, _ = abstract_model(config.model, **config.execution.model_kwargs)
    step_fn = make_train_step(graphdef, layout.optimizer, lr_schedule(config.optimizer, config.total_steps),
                              z_loss=config.optimizer.z_loss, grad_accum=config.execution.grad_accum, mesh=mesh,
                              loss_chunk=config.execution.loss_chunk)
    bsh = batch_sharding(mesh)
    return jax.jit(step_fn, in_shardings=(layout.shardings, bsh), out_shardings=(layout.shardings, replicated(mesh)),
                   donate_argnums=0)


def abstract_batch(config: Config, mesh) -> jax.ShapeDtypeStruct:
    """One global batch of token rows [B, L+1] as a sharded abstract value: nothing is allocated."""
    shape = (config.data.batch_size, config.data.seq_len + 1)
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh))
