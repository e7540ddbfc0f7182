"""An independent float64 numpy port of Apple's ``modeling_openelm.py`` forward.

It reads Hub-layout tensors (PyTorch [out, in] weights) and a Hub
``config.json`` mapping directly, so it shares no code with ``elmjax.model``:
the parity test compares two implementations, not one with itself.
"""

import numpy as np


def _rms(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta):  # x [B, heads, L, E]
    e, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    freqs = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    x1, x2 = x[..., : e // 2], x[..., e // 2 :]
    rotated = np.concatenate([-x2, x1], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def forward(hf: dict, t: dict, tokens: np.ndarray, swap_glu: bool = False) -> np.ndarray:
    """Logits [B, L, V]. ``swap_glu`` builds a deliberately wrong variant."""
    t = {k: np.asarray(v, dtype=np.float64) for k, v in t.items()}
    e = hf["head_dim"]
    x = t["transformer.token_embeddings.weight"][tokens]
    b, length, _ = x.shape
    for i in range(hf["num_transformer_layers"]):
        p = f"transformer.layers.{i}."
        nq, nk = hf["num_query_heads"][i], hf["num_kv_heads"][i]
        h = _rms(x, t[p + "attn_norm.weight"])
        qkv = (h @ t[p + "attn.qkv_proj.weight"].T).reshape(b, length, nq + 2 * nk, e).transpose(0, 2, 1, 3)
        q, k, v = qkv[:, :nq], qkv[:, nq : nq + nk], qkv[:, nq + nk :]
        if hf["normalize_qk_projections"]:
            q = _rms(q, t[p + "attn.q_norm.weight"])
            k = _rms(k, t[p + "attn.k_norm.weight"])
        q, k = _rope(q, hf["rope_freq_constant"]), _rope(k, hf["rope_freq_constant"])
        k = np.repeat(k, nq // nk, axis=1)  # torch.repeat_interleave
        v = np.repeat(v, nq // nk, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(e)
        scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, nq * e)
        x = x + attn @ t[p + "attn.out_proj.weight"].T
        h = _rms(x, t[p + "ffn_norm.weight"])
        y1, y2 = np.split(h @ t[p + "ffn.proj_1.weight"].T, 2, axis=-1)
        if swap_glu:
            y1, y2 = y2, y1
        x = x + (_silu(y1) * y2) @ t[p + "ffn.proj_2.weight"].T
    x = _rms(x, t["transformer.norm.weight"])
    head = t["transformer.token_embeddings.weight"] if hf["share_input_output_layers"] else t["lm_head.weight"]
    return x @ head.T
