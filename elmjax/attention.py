"""Attention kernels behind one function: XLA, cuDNN flash attention, Pallas splash.

``attend(q, k, v, causal=..., mask=..., scale=..., impl=...)`` with
``impl`` one of:

* ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``, any
  backend and dtype; the reference the others are tested against.
* ``cudnn``: cuDNN flash attention (``implementation="cudnn"``); NVIDIA GPUs,
  bfloat16/float16 only.
* ``splash``: the Pallas TPU splash-attention kernel for causal
  self-attention, run once per kv head as multi-query attention over its G
  query heads (grouped-query attention with per-layer head counts). On other
  backends it runs in Pallas interpret mode, which is only for tests.
* ``auto``: cuDNN on GPU in bfloat16/float16, splash on TPU, else XLA.

A call a kernel cannot serve (decoding with a mask over the KV cache, a
sequence that is not a multiple of splash's block) falls back to XLA; each
kind of fallback is logged once. Query head h is served by kv head h // G (OpenELM's order) everywhere.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from elmjax.cpu_attention import causal_attention

from elmjax.sharding import active_mesh, logical_to_spec

log = logging.getLogger(__name__)

IMPLS = ("auto", "xla", "cudnn", "splash")
_HALF = (jnp.bfloat16, jnp.float16)
_SPLASH_BLOCK = 128  # splash's default block; sequences must be a multiple of it


@functools.cache
def _notice(message: str) -> None:
    log.warning(message)


def resolve(impl: str, dtype, platform: str | None = None) -> str:
    """The implementation ``impl`` means for ``dtype`` on ``platform`` (default: JAX's backend)."""
    if impl not in IMPLS:
        raise ValueError(f"attention: {impl!r} is not one of {list(IMPLS)}")
    platform = platform or jax.default_backend()
    if impl == "cudnn" and (platform != "gpu" or jnp.dtype(dtype) not in _HALF):
        raise ValueError(f"attention=cudnn needs an NVIDIA GPU and bfloat16/float16 compute; "
                         f"this is {platform} with {jnp.dtype(dtype).name} (use attention=auto or xla)")
    if impl != "auto":
        return impl
    if platform == "gpu" and jnp.dtype(dtype) in _HALF:
        return "cudnn"
    if platform == "tpu":
        return "splash"
    _notice(f"attention=auto: no fused kernel for {platform} with {jnp.dtype(dtype).name}; using XLA attention")
    return "xla"


def attend(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *, causal: bool, mask=None, scale: float,
           impl: str = "xla") -> jax.Array:
    """Grouped-query attention [B, L, H, E] over keys/values [B, S, K, E]; ``mask``
    (broadcastable to [B, H, L, S], True = attend) and ``causal`` combine."""
    impl = resolve(impl, q_BLHE.dtype)
    L, S = q_BLHE.shape[1], k_BSKE.shape[1]
    if impl != "xla" and (mask is not None or not causal or L != S):
        _notice(f"attention={impl} serves causal self-attention; using XLA for masked calls (decoding)")
        impl = "xla"
    if impl == "splash" and L % _SPLASH_BLOCK:
        _notice(f"attention=splash needs a multiple of {_SPLASH_BLOCK} tokens; using XLA for length {L}")
        impl = "xla"
    if impl == "splash":
        return _splash_sharded(q_BLHE, k_BSKE, v_BSKE, scale)
    if impl == "xla" and causal and mask is None and L == S and jax.default_backend() == "cpu":
        # XLA:CPU's own attention backward is slow (layout copies, transposed
        # matmuls): a hand-written backward, same numbers (elmjax.cpu_attention).
        return causal_attention(q_BLHE, k_BSKE, v_BSKE, scale)
    return jax.nn.dot_product_attention(q_BLHE, k_BSKE, v_BSKE, mask=mask, is_causal=causal, scale=scale,
                                        implementation=impl)


def _splash(q_BLHE, k_BSKE, v_BSKE, scale: float) -> jax.Array:
    """Causal splash attention on one device's shard."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, L, H, E = q_BLHE.shape
    K = k_BSKE.shape[2]
    G = H // K
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([sm.CausalMask((L, L))] * G),
                                              interpret=jax.default_backend() != "tpu")
    # The kernel does not scale: fold the scale into q. Layout [B, K, G, L, E].
    q_BKGLE = (q_BLHE * jnp.asarray(scale, q_BLHE.dtype)).reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4)
    k_BKSE, v_BKSE = k_BSKE.transpose(0, 2, 1, 3), v_BSKE.transpose(0, 2, 1, 3)
    per_kv_head = jax.vmap(jax.vmap(kernel))  # over batch, then kv heads
    out_BKGLE = per_kv_head(q_BKGLE, k_BKSE, v_BKSE)
    return out_BKGLE.transpose(0, 3, 1, 2, 4).reshape(B, L, H, E)


def _splash_sharded(q_BLHE, k_BSKE, v_BSKE, scale: float) -> jax.Array:
    """``_splash`` per shard of the active mesh: a Pallas call is opaque to
    GSPMD, which would otherwise gather q, k and v onto every device."""
    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return _splash(q_BLHE, k_BSKE, v_BSKE, scale)
    # q's head axis is split exactly like the kv heads, so each shard holds
    # whole groups (H = K * G, query head h served by kv head h // G).
    spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k_BSKE.shape, mesh)
    fn = functools.partial(_splash, scale=scale)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        q_BLHE, k_BSKE, v_BSKE)
