"""A run's compiled programs (state init, train step, eval step), kept for the next run of the same shapes.

A sweep trains the same model for several seeds, one after another, in one
process. The persistent compilation cache saves those runs the XLA compile,
but each still traces and lowers every program again (seconds for a tiny
model on a busy CPU). The executables compiled here are kept, keyed by
everything the programs depend on, so the next run of the same shapes reuses
them. The seed is an argument of the init program, not a constant in it, so
one program serves every seed. Only the latest few are kept: an executable
holds code, not buffers, but a ladder of large models should not pile them up.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from elmjax.config import Config
from elmjax.sharding import batch_divisor, batch_sharding, replicated
from elmjax.state import StateLayout, abstract_model
from elmjax.train_program import abstract_batch, jit_train_step
from elmjax.train_step import make_eval_step

KEEP = 4  # programs of this many distinct shapes stay compiled


@dataclass(frozen=True)
class Programs:
    create: object  # (seed: int32 scalar) -> TrainState, placed with the layout's shardings
    train_step: object  # (state, batch [B, L+1]) -> (state, metrics); the state is donated
    eval_step: object  # (params, rows [eval_chunk, L+1], row weights [eval_chunk]) -> sums
    eval_chunk: int  # validation rows per eval_step call

    def init_state(self, seed: int):
        return self.create(np.int32(seed))


_compiled: OrderedDict = OrderedDict()


def eval_chunk(config: Config, mesh) -> int:
    return max(config.data.batch_size, batch_divisor(mesh))


def program_key(config: Config, mesh) -> tuple:
    """Everything the three programs depend on (not the seed, run_dir, data source or schedule of saves)."""
    return (config.model, config.optimizer, config.total_steps, config.execution, config.data.batch_size,
            config.data.seq_len, mesh)


def compiled_programs(config: Config, mesh, layout: StateLayout) -> Programs:
    """The programs of ``config`` on ``mesh``: from the last runs of this process if they match, else compiled now."""
    key = program_key(config, mesh)
    if key in _compiled:
        _compiled.move_to_end(key)
        return _compiled[key]
    seed = jax.ShapeDtypeStruct((), jnp.int32)
    programs = Programs(
        create=jax.jit(layout.create, out_shardings=layout.shardings).lower(seed).compile(),
        # The same program preflight compiles.
        train_step=jit_train_step(config, mesh, layout).lower(layout.target, abstract_batch(config, mesh)).compile(),
        eval_step=_compile_eval_step(config, mesh, layout),
        eval_chunk=eval_chunk(config, mesh),
    )
    _compiled[key] = programs
    while len(_compiled) > KEEP:
        _compiled.popitem(last=False)
    return programs


def _compile_eval_step(config: Config, mesh, layout: StateLayout):
    """The float32, no-remat eval step for one chunk of validation rows."""
    eval_graphdef, _ = abstract_model(config.model, attention=config.execution.attention)
    bsh, wsh = batch_sharding(mesh), batch_sharding(mesh, 1)
    jitted = jax.jit(make_eval_step(eval_graphdef, mesh), in_shardings=(layout.param_shardings, bsh, wsh),
                     out_shardings=replicated(mesh))
    chunk = eval_chunk(config, mesh)
    rows = jax.ShapeDtypeStruct((chunk, config.data.seq_len + 1), jnp.int32, sharding=bsh)
    weights = jax.ShapeDtypeStruct((chunk,), jnp.float32, sharding=wsh)
    return jitted.lower(layout.target.params, rows, weights).compile()
