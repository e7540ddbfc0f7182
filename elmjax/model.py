"""OpenELM decoder in Flax NNX: architecture only.

No mesh names, I/O, optimizer or logging here. Every parameter carries
``logical_axes`` metadata, and activations at layer boundaries are marked
with logical axes through ``constrain``; ``elmjax.sharding`` maps those names
to mesh axes (and makes ``constrain`` a no-op outside a sharded step).

Dimension glossary (suffixes on array names):
  B batch            L query length       S key/value length
  D model_dim        H query heads        K key/value heads
  G = H // K         E head_dim           F FFN width
  V vocab            C = G + 2 slots per kv group (G queries, key, value)

Computation matches Apple's released ``modeling_openelm.py``: pre-RMSNorm
blocks, one fused QKV projection (stored group-major, see ``Attention``;
``hf_interop`` converts from the Hub's [queries, keys, values]), RMSNorm over
head_dim on q and k (before RoPE), rotate-half RoPE, GQA where kv head j
serves query heads j*G .. j*G+G-1, SwiGLU whose fused projection holds the
gate first, final RMSNorm and an output head tied to the embedding.

``cfg.parametrization`` picks the initialisation scales, the attention scale
and the logit multiplier (``elmjax.mup`` holds the rules; 'standard' is
OpenELM's own). Per-matrix learning rates are the optimizer's business.
"""

from __future__ import annotations

import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax import mup
from elmjax.attention import IMPLS as ATTENTION_IMPLS, attend
from elmjax.cpu_matmul import matmul
from elmjax.cpu_swiglu import swiglu
from elmjax.layout import LayerLayout, layer_layout
from elmjax.model_config import ModelConfig
from elmjax.sharding import constrain

# Logical axes of the activations pinned between layers and on the logits.
HIDDEN = ("batch", "length", "embed")
LOGITS = ("batch", "length", "vocab")


class KVCache(NamedTuple):
    """One layer's cache, preallocated to the maximum length S."""

    k_BSKE: jax.Array
    v_BSKE: jax.Array


# Where the initial values of the random parameters come from: None draws each
# one here, from the next key of ``rngs``; ``elmjax.init_draws`` sets a source
# that hands out the same values drawn in one batch (a smaller init program).
PARAM_SOURCE: contextvars.ContextVar = contextvars.ContextVar("elmjax_param_source", default=None)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, axes: tuple[str | None, ...]) -> nnx.Param:
    source = PARAM_SOURCE.get()
    if source is None:
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    else:
        value = source(shape, std)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str | None):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype: bf16 sums of
        # squares lose too much precision over thousands of channels.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...]).astype(x.dtype)


class Rotary(NamedTuple):
    """cos and sin of each token's rotary angles [B, L, E]: computed once per
    forward pass and shared by every layer (they depend on positions only)."""

    cos_BLE: jax.Array
    sin_BLE: jax.Array


def rotary(positions_BL: jax.Array, head_dim: int, theta: float) -> Rotary:
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BLe = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    angles_BLE = jnp.concatenate([angles_BLe, angles_BLe], axis=-1)
    # The barrier materialises the tables where the backend keeps barriers
    # until after fusion (GPU): otherwise XLA fuses cos and sin into every
    # consumer and recomputes them for each head of each layer, forward and
    # backward. XLA:CPU removes barriers before fusing, hence ``default_rotary``.
    return Rotary(*jax.lax.optimization_barrier((jnp.cos(angles_BLE), jnp.sin(angles_BLE))))


@functools.lru_cache(maxsize=64)
def default_rotary(length: int, head_dim: int, theta: float) -> Rotary:
    """``rotary`` at positions 0..length-1, shared by every row: tables [1, L, E]
    computed now, by the same XLA ops, and embedded in the program as
    constants. Training and evaluation use these positions; as constants the
    tables cannot be fused into (and recomputed by) every consumer on any
    backend, which cost about 7% of the tiny model's CPU train step."""
    with jax.ensure_compile_time_eval():
        rot = rotary(jnp.arange(length)[None], head_dim, theta)
    tables = tuple(np.asarray(jax.device_get(t)) for t in rot)
    for t in tables:
        t.setflags(write=False)  # cached and shared: never written in place
    return Rotary(*tables)


def apply_rotary(x_BLHE: jax.Array, rot: Rotary) -> jax.Array:
    """Rotate-half RoPE over the full head dim, computed in float32."""
    x32 = x_BLHE.astype(jnp.float32)
    # rotate_half(x) = [-x2, x1], written as a flip of the two halves and a
    # sign instead of split + concatenate: same numbers, but its gradient is
    # the same cheap flip rather than zero-padding both halves and adding.
    halves = x32.reshape(*x32.shape[:-1], 2, x32.shape[-1] // 2)
    rotated = (jnp.flip(halves, axis=-2) * jnp.array([[-1.0], [1.0]], jnp.float32)).reshape(x32.shape)
    cos, sin = rot.cos_BLE[:, :, None, :], rot.sin_BLE[:, :, None, :]
    return (x32 * cos + rotated * sin).astype(x_BLHE.dtype)


def rope(x_BLHE: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Rotate-half rotary embedding of one tensor at ``positions_BL``."""
    return apply_rotary(x_BLHE, rotary(positions_BL, x_BLHE.shape[-1], theta))


class Attention(nnx.Module):
    """Grouped-query attention with a group-major fused QKV projection.

    ``qkv_DKCE`` holds, for each kv head k, its G query heads (C = 0..G-1),
    then its key (C = G) and its value (C = G+1). Query head h = k*G + g is
    served by kv head k (OpenELM's repeat_interleave order), so splitting the
    K axis across devices gives each device whole groups: queries, keys and
    values of a group never live on different devices."""

    def __init__(self, cfg: ModelConfig, layout: LayerLayout, rngs: nnx.Rngs, impl: str = "xla"):
        D, E = cfg.model_dim, cfg.head_dim
        self.impl = impl  # elmjax.attention implementation
        self.num_q, self.num_kv = layout.q_heads, layout.kv_heads
        self.groups = self.num_q // self.num_kv
        self.head_dim = E
        self.scale = mup.attention_scale(cfg)
        K, G = self.num_kv, self.groups
        qkv_std = mup.hidden_init_std(cfg, fan_in=D, residual_output=False)
        self.qkv_DKCE = _param(rngs, (D, K, G + 2, E), qkv_std, ("embed", "kv_heads", None, "head_dim"))
        out_std = mup.hidden_init_std(cfg, fan_in=K * G * E, residual_output=True)
        self.out_KGED = _param(rngs, (K, G, E, D), out_std, ("kv_heads", None, "head_dim", "embed"))
        if cfg.normalize_qk:
            self.q_norm = RMSNorm(E, cfg.norm_eps, "head_dim")
            self.k_norm = RMSNorm(E, cfg.norm_eps, "head_dim")
        else:
            self.q_norm = self.k_norm = None

    def project(self, x_BLD: jax.Array, rot: Rotary):
        """Queries, keys and values after QK-norm and RoPE."""
        B, L, D = x_BLD.shape
        K, G, E = self.num_kv, self.groups, self.head_dim
        w_DKCE = self.qkv_DKCE[...].astype(x_BLD.dtype)
        # One matmul of flat [B*L, D] rows against the fused weight, then the
        # roles sliced out of its output: XLA:CPU runs 2-D matmuls on its fast
        # path (``elmjax.cpu_matmul`` puts their weight gradients there too).
        # Slicing the weight instead copies it (and, backward, zero-pads each
        # slice's gradient) every step; one wider matmul is also faster on
        # small models (with ``elmjax.cpu_swiglu``, 0.96x tiny step time).
        x_ND = x_BLD.reshape(B * L, D)
        qkv_NKCE = matmul(x_ND, w_DKCE)
        q_BLHE = qkv_NKCE[:, :, :G].reshape(B, L, K * G, E)
        k_BLKE = qkv_NKCE[:, :, G].reshape(B, L, K, E)
        v_BLKE = qkv_NKCE[:, :, G + 1].reshape(B, L, K, E)
        q_BLHE = constrain(q_BLHE, ("batch", "length", "heads", "head_dim"))
        k_BLKE = constrain(k_BLKE, ("batch", "length", "kv_heads", "head_dim"))
        v_BLKE = constrain(v_BLKE, ("batch", "length", "kv_heads", "head_dim"))
        if self.q_norm is not None:
            q_BLHE, k_BLKE = self.q_norm(q_BLHE), self.k_norm(k_BLKE)
        return apply_rotary(q_BLHE, rot), apply_rotary(k_BLKE, rot), v_BLKE

    def output(self, attn_BLHE: jax.Array) -> jax.Array:
        B, L, H, E = attn_BLHE.shape
        # Pinned by kv group (heads are group-major), then one flat [B*L, H*E]
        # matmul: XLA:CPU's fast path, same numbers as the 4-D einsum.
        attn_BLHE = constrain(attn_BLHE, ("batch", "length", "heads", "head_dim"))
        w_ND = self.out_KGED[...].astype(attn_BLHE.dtype).reshape(H * E, -1)
        return matmul(attn_BLHE.reshape(B * L, H * E), w_ND).reshape(B, L, -1)

    def __call__(self, x_BLD: jax.Array, rot: Rotary, mask_B1LL: jax.Array | None = None) -> jax.Array:
        q, k, v = self.project(x_BLD, rot)
        # Every implementation groups query head h with kv head h // G,
        # which is OpenELM's repeat_interleave order.
        attn_BLHE = attend(q, k, v, causal=True, mask=mask_B1LL, scale=self.scale, impl=self.impl)
        return self.output(attn_BLHE)

    def attend_cached(self, x_BLD, rot: Rotary, positions_BL, cache: KVCache, mask_BLS):
        """Attention for decoding: write this step's keys/values into ``cache``
        at ``positions_BL`` and attend over the slots ``mask_BLS`` allows."""
        q, k, v = self.project(x_BLD, rot)
        rows_B1 = jnp.arange(x_BLD.shape[0])[:, None]
        k_cache = cache.k_BSKE.at[rows_B1, positions_BL].set(k.astype(cache.k_BSKE.dtype))
        v_cache = cache.v_BSKE.at[rows_B1, positions_BL].set(v.astype(cache.v_BSKE.dtype))
        attn_BLHE = attend(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), causal=False, mask=mask_BLS[:, None],
                           scale=self.scale, impl=self.impl)
        return self.output(attn_BLHE), KVCache(k_cache, v_cache)


class FeedForward(nnx.Module):
    def __init__(self, cfg: ModelConfig, layout: LayerLayout, rngs: nnx.Rngs):
        D, F = cfg.model_dim, layout.ffn_dim
        self.glu = cfg.ffn_with_glu
        # Fused SwiGLU input projection: index 0 of the middle axis is the
        # SiLU gate, index 1 the linear branch (OpenELM's chunk(2) order).
        parts = 2 if self.glu else 1
        self.in_DPF = _param(rngs, (D, parts, F), mup.hidden_init_std(cfg, fan_in=D, residual_output=False),
                             ("embed", None, "mlp"))
        out_std = mup.hidden_init_std(cfg, fan_in=F, residual_output=True)
        self.out_FD = _param(rngs, (F, D), out_std, ("mlp", "embed"))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        B, L, D = x_BLD.shape
        w_DPF = self.in_DPF[...].astype(x_BLD.dtype)
        # Flat [B*L, D] rows and one matmul against the fused weight, for
        # the same reasons as in ``Attention.project``.
        u_NPF = matmul(x_BLD.reshape(B * L, D), w_DPF)
        h_NF = swiglu(u_NPF) if self.glu else jax.nn.silu(u_NPF[:, 0])
        h_BLF = constrain(h_NF.reshape(B, L, -1), ("batch", "length", "mlp"))
        out_ND = matmul(h_BLF.reshape(B * L, -1), self.out_FD[...].astype(h_BLF.dtype))
        return out_ND.reshape(B, L, D)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layout: LayerLayout, rngs: nnx.Rngs, attention: str = "xla"):
        self.attn_norm = RMSNorm(cfg.model_dim, cfg.norm_eps, "embed")
        self.attn = Attention(cfg, layout, rngs, attention)
        self.ffn_norm = RMSNorm(cfg.model_dim, cfg.norm_eps, "embed")
        self.ffn = FeedForward(cfg, layout, rngs)

    def __call__(self, x_BLD: jax.Array, rot: Rotary, mask_B1LL: jax.Array | None = None) -> jax.Array:
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), rot, mask_B1LL)
        return x_BLD + self.ffn(self.ffn_norm(x_BLD))

    def decode(self, x_BLD, rot: Rotary, positions_BL, cache: KVCache, mask_BLS):
        attn_BLD, cache = self.attn.attend_cached(self.attn_norm(x_BLD), rot, positions_BL, cache, mask_BLS)
        x_BLD = x_BLD + attn_BLD
        return x_BLD + self.ffn(self.ffn_norm(x_BLD)), cache


def _run_layer(layer: DecoderLayer, x_BLD, rot: Rotary, mask_B1LL):
    return layer(x_BLD, rot, mask_B1LL)


# Rematerialise each decoder layer: activations are recomputed in the backward
# pass instead of stored, trading ~1/3 more FLOPs for O(1) layers of memory.
_run_layer_remat = nnx.remat(_run_layer)


class OpenELM(nnx.Module):
    """The decoder. ``cfg`` says what the model is; the keywords say how it
    executes: compute ``dtype`` of activations and matmuls (parameters stay
    float32), per-layer ``remat`` and the ``attention`` implementation. They
    change no parameter and (up to float rounding) no result."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: str = "float32", remat: bool = False,
                 attention: str = "xla"):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        self.attention = attention
        D, V = cfg.model_dim, cfg.vocab_size
        self.embed_VD = _param(rngs, (V, D), mup.embed_init_std(cfg), ("vocab", "embed"))
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention: {attention!r} is not one of {list(ATTENTION_IMPLS)}")
        self.layers = nnx.List([DecoderLayer(cfg, lay, rngs, attention) for lay in layer_layout(cfg)])
        self.norm = RMSNorm(D, cfg.norm_eps, "embed")
        self.head_DV = None if cfg.tie_embeddings else _param(rngs, (D, V), mup.head_init_std(cfg), ("embed", "vocab"))
        self.logit_multiplier = mup.logit_multiplier(cfg)

    def embed(self, tokens_BL: jax.Array) -> jax.Array:
        return constrain(self.embed_VD[...].astype(self.dtype)[tokens_BL], HIDDEN)

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        x_BLD = self.norm(x_BLD)
        # Logits accumulate and stay in float32 for a stable softmax / loss.
        if self.head_DV is None:
            out = jnp.einsum("bld,vd->blv", x_BLD, self.embed_VD[...].astype(self.dtype), preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("bld,dv->blv", x_BLD, self.head_DV[...].astype(self.dtype), preferred_element_type=jnp.float32)
        if self.logit_multiplier != 1.0:  # muP's tied readout; standard skips it (same program as before)
            out = out * self.logit_multiplier
        return constrain(out, LOGITS)

    def hidden(self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None,
               segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """The last layer's output [B, L, D], before the final norm and head.

        ``segment_ids_BL`` (packed sequences): a token attends only to earlier
        tokens with the same id, so packed examples never see each other."""
        if positions_BL is None:
            rot = default_rotary(tokens_BL.shape[1], self.cfg.head_dim, self.cfg.rope_theta)
        else:
            rot = rotary(positions_BL, self.cfg.head_dim, self.cfg.rope_theta)
        mask_B1LL = None
        if segment_ids_BL is not None:
            mask_B1LL = (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])[:, None]
        x_BLD = self.embed(tokens_BL)
        run = _run_layer_remat if self.remat else _run_layer
        for layer in self.layers:
            x_BLD = constrain(run(layer, x_BLD, rot, mask_B1LL), HIDDEN)
        return x_BLD

    def __call__(self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None, *,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Float32 logits [B, L, V] for token ids [B, L] (causal; see ``hidden`` for ``segment_ids``)."""
        return self.logits(self.hidden(tokens_BL, positions_BL, segment_ids))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> list[KVCache]:
        """Zeroed per-layer caches; each layer has its own kv head count."""
        dtype = dtype or self.dtype
        return [
            KVCache(
                jnp.zeros((batch, max_len, layer.attn.num_kv, layer.attn.head_dim), dtype),
                jnp.zeros((batch, max_len, layer.attn.num_kv, layer.attn.head_dim), dtype),
            )
            for layer in self.layers
        ]

    def decode(self, tokens_BL, positions_BL, caches: list[KVCache], mask_BLS):
        """Logits for new tokens at ``positions_BL`` given per-layer caches;
        ``mask_BLS`` says which cache slots each new token may attend to."""
        x_BLD = self.embed(tokens_BL)
        rot = rotary(positions_BL, self.cfg.head_dim, self.cfg.rope_theta)
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x_BLD, cache = layer.decode(x_BLD, rot, positions_BL, cache, mask_BLS)
            new_caches.append(cache)
        return self.logits(x_BLD), new_caches
