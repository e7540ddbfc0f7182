"""A run's fresh train state assembled on the host, bit for bit the init program's, without compiling one.

The init program (``StateLayout.create``, jitted) is shaped by the model: XLA
compiles its parameter slices and scales, ones and optimizer zeros as kernels
of their own for every distinct model, although it runs once per run. In a
sweep worker (one core) that was 1.6-2.0 s per quickstart model, a quarter
of the train step's compile. Here the same state is put together on the host:

- random parameters from ``elmjax.init_draws.host_draws`` (two small
  programs that no model's shapes enter, so the first model compiles them and
  every later one reuses them);
- the rest of the parameters (norm weights) from building the model eagerly
  with those values, as ``init_params`` builds it under ``jit``;
- the step and optimizer state as host zeros, used only where tracing the
  optimizer's ``init`` shows that every value it makes is a constant zero
  (``zero_shapes``); any other optimizer keeps the compiled init program.

Then each leaf is placed with its layout sharding (``sharding.global_array``,
as evaluation places its rows). Used where ``init_draws.usable`` holds
(threefry keys, models up to ``BATCH_LIMIT`` parameters);
tests/test_host_state.py checks every bit against the compiled init program.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax import init_draws
from elmjax.model import OpenELM
from elmjax.model_config import ModelConfig
from elmjax.sharding import global_array
from elmjax.state import StateLayout, TrainState

_ZERO_PRESERVING = {"broadcast_in_dim", "convert_element_type", "reshape", "copy"}


def host_creator(model: ModelConfig, layout: StateLayout) -> Callable[[int], TrainState] | None:
    """``seed -> TrainState`` with the bits and shardings of ``layout.create``; None where this cannot promise
    them (see the module docstring), and the caller compiles ``layout.create``."""
    plan = init_draws.draw_plan(lambda: OpenELM(model, rngs=nnx.Rngs(0)))
    if not init_draws.usable(plan, jax.random.key(0)):
        return None
    rest = zero_shapes(lambda params: (jnp.zeros((), jnp.int32), layout.optimizer.init(params)),
                       layout.target.params)
    if rest is None:
        return None

    def create(seed) -> TrainState:
        key = jax.random.key(seed)  # what init_params makes of the seed
        with init_draws.drawing(plan, init_draws.host_draws(key, plan)):
            built = OpenELM(model, rngs=nnx.Rngs(key))
        params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(built, nnx.Param)))
        # Made per call (numpy's zeros cost nothing until touched), so kept programs hold no state-sized arrays.
        step, opt_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), rest)
        return jax.tree.map(global_array, TrainState(step, params, opt_state), layout.shardings)

    return create


def zero_shapes(fn: Callable, *abstract_args) -> object | None:
    """The shapes (``jax.eval_shape``) of ``fn(*args)`` when every value it returns is a constant +0 whatever
    its arguments (checked on its jaxpr: literals and broadcasts or casts of them), else None."""
    closed = jax.make_jaxpr(fn)(*abstract_args)
    jaxpr = closed.jaxpr
    consts = dict(zip(jaxpr.constvars, closed.consts))
    producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}

    def is_zero(v) -> bool:
        if isinstance(v, jax.extend.core.Literal):
            return _all_plus_zero(v.val)
        if v in consts:
            return _all_plus_zero(consts[v])
        eqn = producers.get(v)  # None: an argument of fn, passed through
        return eqn is not None and eqn.primitive.name in _ZERO_PRESERVING and is_zero(eqn.invars[0])

    if not all(is_zero(v) for v in jaxpr.outvars):
        return None
    shapes = jax.eval_shape(fn, *abstract_args)
    if any(jax.dtypes.issubdtype(s.dtype, jax.dtypes.extended) for s in jax.tree.leaves(shapes)):
        return None  # e.g. PRNG keys: no numpy zeros for them
    return shapes


def _all_plus_zero(value) -> bool:
    a = np.asarray(value)
    if a.dtype.kind not in "biuf":
        return False
    return bool(np.all(a == 0) and not np.any(np.signbit(a)))
