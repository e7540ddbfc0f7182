"""elmjax's train step against PyTorch eager on the same model, in one process.

    python -m elmjax.bench_torch --config elmjax/configs/tiny_cpu.yaml --batch 16 --seq-len 128
    python -m elmjax.bench_torch --preset OpenELM-270M --batch 2 --seq-len 256 --steps 2 --rounds 3

Needs PyTorch, which elmjax does not depend on (CPU build:
``pip install torch --index-url https://download.pytorch.org/whl/cpu``).

The PyTorch side follows Apple's ``modeling_openelm.py`` (the Hub layout:
fused qkv [queries, keys, values], QK RMSNorm, rotate-half RoPE,
repeat_interleave for GQA, ``scaled_dot_product_attention``, chunked SwiGLU,
tied head) and trains with ``torch.optim.AdamW`` and gradient clipping, as a
PyTorch user of the HF code would. It starts from elmjax's own initial
parameters (``hf_interop.params_to_hf``); the script checks that both give
the same first loss before it times anything. The steps alternate in rounds
so machine noise hits both; the ratio is the number to compare.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from elmjax import config_io
from elmjax.config import Config, ExecutionConfig
from elmjax.cpu_heap import keep_scratch_in_heap
from elmjax.hf_interop import config_to_hf, params_to_hf
from elmjax.model_config import preset


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


class TorchOpenELM:
    """A forward over Hub-named tensors (``params_to_hf``), in PyTorch eager."""

    def __init__(self, torch, hf: dict, tensors: dict[str, np.ndarray], norm_eps: float):
        self.torch, self.hf, self.eps = torch, hf, norm_eps
        self.w = {k: torch.nn.Parameter(torch.from_numpy(np.array(v, np.float32))) for k, v in tensors.items()}
        e = hf["head_dim"]
        self.inv_freq = 1.0 / (hf["rope_freq_constant"] ** (torch.arange(0, e, 2, dtype=torch.float32) / e))

    def parameters(self):
        return list(self.w.values())

    def _rms(self, x, weight):
        x32 = x.float()
        return x32 * self.torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rope(self, x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + self.torch.cat((-x2, x1), dim=-1) * sin

    def __call__(self, tokens):
        torch, hf, w = self.torch, self.hf, self.w
        F = torch.nn.functional
        e = hf["head_dim"]
        b, length = tokens.shape
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        x = F.embedding(tokens, w["transformer.token_embeddings.weight"])
        for i in range(hf["num_transformer_layers"]):
            p = f"transformer.layers.{i}."
            nq, nk = hf["num_query_heads"][i], hf["num_kv_heads"][i]
            h = self._rms(x, w[p + "attn_norm.weight"])
            qkv = F.linear(h, w[p + "attn.qkv_proj.weight"]).view(b, length, nq + 2 * nk, e).transpose(1, 2)
            q, k, v = qkv.split([nq, nk, nk], dim=1)
            if hf["normalize_qk_projections"]:
                q, k = self._rms(q, w[p + "attn.q_norm.weight"]), self._rms(k, w[p + "attn.k_norm.weight"])
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            k, v = k.repeat_interleave(nq // nk, dim=1), v.repeat_interleave(nq // nk, dim=1)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + F.linear(attn.transpose(1, 2).reshape(b, length, nq * e), w[p + "attn.out_proj.weight"])
            h = self._rms(x, w[p + "ffn_norm.weight"])
            y1, y2 = F.linear(h, w[p + "ffn.proj_1.weight"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(y1) * y2, w[p + "ffn.proj_2.weight"])
        x = self._rms(x, w["transformer.norm.weight"])
        head = w["transformer.token_embeddings.weight"] if hf["share_input_output_layers"] else w["lm_head.weight"]
        return F.linear(x, head)


def torch_train_step(torch, model: TorchOpenELM, opt, clip_norm: float):
    def step(tokens):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        opt.step()
        return loss.detach()
    return step


def _timed(fn, steps: int) -> float:
    t0 = time.perf_counter()
    fn(steps)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m elmjax.bench_torch", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="elmjax/configs/tiny_cpu.yaml", help="training config YAML (its model and optimizer)")
    p.add_argument("--preset", help="an OpenELM preset (e.g. OpenELM-270M) instead of the config's model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    torch = _torch()
    if torch is None:
        print("error: PyTorch is not installed; it is only needed for this comparison:\n"
              "  pip install torch --index-url https://download.pytorch.org/whl/cpu", file=sys.stderr)
        return 2
    keep_scratch_in_heap()  # before JAX starts its CPU client, as elmjax.bench
    import jax

    from elmjax.bench import _compile

    try:
        config = config_io.load(Config, args.config, [])
    except config_io.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, opt_cfg = (preset(args.preset) if args.preset else config.model), config.optimizer
    if jax.default_backend() != "cpu":
        print(f"note: JAX runs on {jax.default_backend()}, PyTorch on the CPU", file=sys.stderr)
    arm = _compile(cfg, ExecutionConfig(dtype="float32"), args.batch, args.seq_len)
    params = jax.tree.map(np.asarray, jax.device_get(arm.state.params))  # before the donating step
    model = TorchOpenELM(torch, config_to_hf(cfg, "float32"), params_to_hf(cfg, params), cfg.norm_eps)
    opt = torch.optim.AdamW(model.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps,
                            weight_decay=opt_cfg.weight_decay)
    tstep = torch_train_step(torch, model, opt, opt_cfg.clip_norm)
    ttokens = torch.from_numpy(np.asarray(arm.tokens).astype(np.int64))

    # Same function: the first losses (before any update) agree.
    arm.state, metrics = arm.compiled(arm.state, arm.tokens)
    jax_loss, torch_loss = float(metrics["loss"]), float(tstep(ttokens))
    print(f"first loss: elmjax {jax_loss:.6f}  PyTorch {torch_loss:.6f}")
    if not np.isclose(jax_loss, torch_loss, rtol=1e-4):
        print("error: the two implementations disagree; not timing them", file=sys.stderr)
        return 1

    def run_jax(steps):
        for _ in range(steps):
            arm.state, m = arm.compiled(arm.state, arm.tokens)
        jax.block_until_ready(m)

    def run_torch(steps):
        for _ in range(steps):
            tstep(ttokens)

    run_jax(1), run_torch(1)  # warm-up
    seconds = {"elmjax": 0.0, "PyTorch": 0.0}
    for _ in range(args.rounds):
        seconds["elmjax"] += _timed(run_jax, args.steps)
        seconds["PyTorch"] += _timed(run_torch, args.steps)
    tokens = args.rounds * args.steps * args.batch * args.seq_len
    print(f"device: cpu, {torch.get_num_threads()} PyTorch threads, JAX on {jax.devices()[0].device_kind}; "
          f"batch {args.batch} x {args.seq_len}, float32, AdamW")
    for name, s in seconds.items():
        print(f"{name:>8}: {tokens / s:,.0f} tokens/s  ({1e3 * s / (args.rounds * args.steps):.1f} ms/step)")
    print(f"ratio elmjax / PyTorch tokens/s: {seconds['PyTorch'] / seconds['elmjax']:.3f}  (target >= 1.1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
