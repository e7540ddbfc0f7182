"""elmjax's train step against PyTorch eager on the same model.

    python -m elmjax.bench_torch --config elmjax/configs/tiny_cpu.yaml --batch 16 --seq-len 128
    python -m elmjax.bench_torch --preset OpenELM-270M --batch 2 --seq-len 256 --steps 2 --rounds 3 --separate

Needs PyTorch, which elmjax does not depend on (CPU build:
``pip install torch --index-url https://download.pytorch.org/whl/cpu``).

The PyTorch side follows Apple's ``modeling_openelm.py`` (the Hub layout:
fused qkv [queries, keys, values], QK RMSNorm, rotate-half RoPE,
repeat_interleave for GQA, ``scaled_dot_product_attention``, chunked SwiGLU,
tied head) and trains with ``torch.optim.AdamW`` and gradient clipping, as a
PyTorch user of the HF code would. It starts from elmjax's own initial
parameters (``hf_interop.params_to_hf``); the script checks that both give
the same first loss before it times anything. The steps alternate in rounds
so machine noise hits both; the ratio is the number to compare. By default
both run in one process. ``--separate`` runs each round of each side in a
fresh process (which still checks the first losses): at OpenELM-270M,
sharing a process with PyTorch's model and optimizer state made elmjax's
step about 2x slower than alone (cause not found).
"""

from __future__ import annotations

import argparse
import re
import subprocess
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


SIDES = ("elmjax", "PyTorch")


def _timed(fn, steps: int) -> float:
    t0 = time.perf_counter()
    fn(steps)
    return time.perf_counter() - t0


def _torch_side(torch, cfg, opt_cfg, params: dict, tokens: np.ndarray):
    """PyTorch's model at elmjax's initial ``params`` and its train step on ``tokens``:
    (run(steps), the loss of its first step)."""
    model = TorchOpenELM(torch, config_to_hf(cfg, "float32"), params_to_hf(cfg, params), cfg.norm_eps)
    opt = torch.optim.AdamW(model.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps,
                            weight_decay=opt_cfg.weight_decay)
    step = torch_train_step(torch, model, opt, opt_cfg.clip_norm)
    ttokens = torch.from_numpy(tokens.astype(np.int64))
    first = float(step(ttokens))

    def run(steps):
        for _ in range(steps):
            step(ttokens)

    return run, first


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m elmjax.bench_torch", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="elmjax/configs/tiny_cpu.yaml", help="training config YAML (its model and optimizer)")
    p.add_argument("--preset", help="an OpenELM preset (e.g. OpenELM-270M) instead of the config's model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--separate", action="store_true",
                   help="time each side in its own process, alternating rounds (for large models: see the README)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side only: what --separate runs
    return p


def _sides(torch, args, cfg, opt_cfg) -> dict[str, float]:
    """Seconds of each side's timed steps (``args.side`` only, when given), after checking that
    the first losses agree."""
    import jax

    from elmjax.bench import _compile

    arm = _compile(cfg, ExecutionConfig(dtype="float32"), args.batch, args.seq_len)
    runs = {}

    def run_jax(steps):
        for _ in range(steps):
            arm.state, m = arm.compiled(arm.state, arm.tokens)
        jax.block_until_ready(m)

    if args.side != "PyTorch":
        runs["elmjax"] = run_jax
    if args.side != "elmjax":
        # Built from elmjax's initial parameters, before the donating step; the PyTorch side's
        # process checks the first losses (an elmjax-only process never builds PyTorch's model:
        # at 270M its memory alone slowed elmjax's step about 2x).
        params = jax.tree.map(np.asarray, jax.device_get(arm.state.params))
        run_torch, torch_loss = _torch_side(torch, cfg, opt_cfg, params, np.asarray(arm.tokens))
        arm.state, metrics = arm.compiled(arm.state, arm.tokens)
        jax_loss = float(metrics["loss"])
        print(f"first loss: elmjax {jax_loss:.6f}  PyTorch {torch_loss:.6f}")
        if not np.isclose(jax_loss, torch_loss, rtol=1e-4):
            raise ValueError("the two implementations disagree (first loss); not timing them")
        runs["PyTorch"] = run_torch
        if args.side == "PyTorch":
            del arm  # this process times PyTorch alone
    for run in runs.values():
        run(1)  # warm-up
    seconds = {name: 0.0 for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            seconds[name] += _timed(run, args.steps)
    return seconds


def _separate(args) -> dict[str, float]:
    """Each round of each side in a fresh ``--side`` process; the seconds of their timed steps."""
    model = ["--preset", args.preset] if args.preset else []
    common = [sys.executable, "-m", "elmjax.bench_torch", "--config", args.config, *model, "--batch", str(args.batch),
              "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--rounds", "1"]
    seconds = {name: 0.0 for name in SIDES}
    for r in range(args.rounds):
        for name in SIDES:
            cmd = [*common, "--side", name]
            out = subprocess.run(cmd, capture_output=True, text=True)
            found = re.search(r"^timed (\S+) s$", out.stdout, re.M)
            if out.returncode != 0 or not found:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
            seconds[name] += float(found.group(1))
            print(f"round {r + 1}/{args.rounds} {name}: {float(found.group(1)):.2f} s", flush=True)
    return seconds


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    torch = _torch()
    if torch is None:
        print("error: PyTorch is not installed; it is only needed for this comparison:\n"
              "  pip install torch --index-url https://download.pytorch.org/whl/cpu", file=sys.stderr)
        return 2
    try:  # checked here, before any process compiles anything
        config = config_io.load(Config, args.config, [])
    except config_io.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keep_scratch_in_heap()  # before JAX starts its CPU client, as elmjax.bench
    try:
        if args.separate:
            seconds, where = _separate(args), "each side in its own process"
        else:
            cfg = preset(args.preset) if args.preset else config.model
            seconds, where = _sides(torch, args, cfg, config.optimizer), "in one process"
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.side:
        print(f"timed {seconds[args.side]:.6f} s")
        return 0
    tokens = args.rounds * args.steps * args.batch * args.seq_len
    print(f"CPU, {torch.get_num_threads()} PyTorch threads, {where}; batch {args.batch} x {args.seq_len}, "
          f"float32, AdamW")
    for name, s in seconds.items():
        print(f"{name:>8}: {tokens / s:,.0f} tokens/s  ({1e3 * s / (args.rounds * args.steps):.1f} ms/step)")
    print(f"ratio elmjax / PyTorch tokens/s: {seconds['PyTorch'] / seconds['elmjax']:.3f}  (target >= 1.1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
