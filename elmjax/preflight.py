"""Memory and cost of a training config before anything trains.

    python -m elmjax.preflight CONFIG.yaml [key=value ...] [--devices N]
        [--accelerator h100|h200|a100|v5e|v5p|v4|cpu] [--hbm-gib G] [--json]

AOT-compiles the real train step (``elmjax.train_program``: the same jit,
shardings and donation as training) on the configured mesh from abstract
inputs only, so nothing is allocated, and reports per device: parameter,
optimizer-state and temporary bytes and their total; the collectives of the
optimized HLO (``elmjax.hlo_stats``); FLOPs per step, analytic and from XLA;
compile time; a roofline step time and MFU ceiling for ``--accelerator``
(``elmjax.roofline``, assumptions there); and whether it fits ``--hbm-gib``
(default: the accelerator's memory).

``--devices N`` compiles for N fake CPU devices
(``--xla_force_host_platform_device_count``), so a laptop checks a 64-device
mesh. The data are never read: the tokenizer's vocabulary is not checked
against ``model.vocab_size`` (training does that).

Memory: ``total_bytes`` is XLA's own account of the step on one device,
arguments + outputs - aliased (donated) + temporaries. ``params_bytes`` and
``opt_state_bytes`` are the shards of the state on one device (they are part
of the arguments). On GPU, JAX preallocates 75% of the memory by default
(``XLA_PYTHON_CLIENT_MEM_FRACTION``); pass ``--hbm-gib`` accordingly.

Exit status: 0 fits, 1 does not fit, 2 bad config or mesh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

ACCELERATOR_NAMES = ("h100", "h200", "a100", "v5e", "v5p", "v4", "cpu")


class PreflightError(ValueError):
    """A config, mesh or device request preflight cannot check."""


def force_host_devices(n: int) -> None:
    """Ask for ``n`` fake CPU devices; must run before JAX initialises its backend."""
    if n < 1:
        raise PreflightError(f"--devices must be >= 1, got {n}")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported, maybe not initialised yet: the config was read at import
        sys.modules["jax"].config.update("jax_platforms", "cpu")




@dataclass(frozen=True)
class Compiled:
    """One AOT-compiled train step and what is needed to report on it."""

    compiled: object
    layout: object
    mesh: object
    compile_s: float


def compile_step(config) -> Compiled:
    """AOT-compile ``config``'s train step on its mesh from abstract inputs."""
    from elmjax.sharding import MeshError, make_mesh
    from elmjax.train_program import abstract_batch, check_batch, jit_train_step

    try:
        mesh = make_mesh(config.mesh)
    except MeshError as e:
        raise PreflightError(str(e)) from None
    check_batch(config, mesh)
    from elmjax.state import state_layout

    layout = state_layout(config, mesh)
    t0 = time.perf_counter()
    compiled = jit_train_step(config, mesh, layout).lower(layout.target, abstract_batch(config, mesh)).compile()
    return Compiled(compiled, layout, mesh, time.perf_counter() - t0)


def _shard_bytes(tree) -> int:
    """Bytes of one device's shards of an abstract, sharded pytree (the largest shard per leaf)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _xla_cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return cost or {}


def _compiled_on_cpu(c: Compiled) -> bool:
    return c.mesh.devices.flat[0].platform == "cpu"


def report(config, c: Compiled, accelerator: str, hbm_gib: float | None) -> dict:
    """The preflight report of a compiled step, as a JSON-ready dict."""
    from elmjax import hlo_stats, roofline
    from elmjax.layout import train_flops_per_token
    from elmjax.sharding import divisibility_report

    n = c.mesh.size
    mem = c.compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    collectives = hlo_stats.parse_collectives(c.compiled.as_text())
    cost = _xla_cost(c.compiled)
    xla_device_flops = float(cost.get("flops", 0.0))
    analytic = train_flops_per_token(config.model, config.data.seq_len) * config.tokens_per_step
    acc = roofline.accelerator(accelerator, n)
    dtype = config.execution.dtype
    xla_bytes = float(cost.get("bytes accessed", 0.0))
    # The CPU compiler's traffic says nothing about an accelerator's fusion: use the state-in-and-out lower bound.
    basis = "state" if _compiled_on_cpu(c) and acc.name != "cpu" else "xla"
    traffic = mem.argument_size_in_bytes + mem.output_size_in_bytes if basis == "state" else xla_bytes
    est = roofline.estimate(acc, dtype, xla_device_flops, float(traffic),
                            sum(hlo_stats.wire_bytes(x) for x in collectives))
    ceiling = roofline.mfu_ceiling(acc, dtype, analytic, n, est)
    hbm = hbm_gib * roofline.GIB if hbm_gib is not None else acc.hbm_bytes
    return {
        "devices": n,
        "mesh": dict(c.mesh.shape),
        "accelerator": acc.name,
        "dtype": dtype,
        "per_device": {
            "params_bytes": _shard_bytes(c.layout.target.params),
            "opt_state_bytes": _shard_bytes(c.layout.target.opt_state),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
            "total_bytes": int(total),
        },
        "collectives": hlo_stats.summarize(collectives),
        # Parameter dimensions the mesh does not divide (replicated, not split): what and how many bytes.
        "replicated": [r._asdict() for r in divisibility_report(config.model, dict(c.mesh.shape))],
        "flops_per_step": {"analytic": int(analytic), "xla": xla_device_flops * n, "xla_per_device": xla_device_flops},
        "compile_s": round(c.compile_s, 3),
        "xla_bytes_accessed_per_device": xla_bytes,
        "estimate": None if est is None else {**asdict(est), "step_s": est.step_s, "bound": est.bound,
                                              "memory_basis": basis, "mfu_ceiling": ceiling,
                                              "tokens_per_s": config.tokens_per_step / est.step_s},
        "hbm_bytes": int(hbm),
        "fits": bool(total <= hbm),
    }


def _size(b: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def format_report(r: dict, source: str = "") -> str:
    pd, mesh = r["per_device"], " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [f"preflight {source} on {r['devices']} devices (mesh {mesh}), {r['dtype']}, accelerator {r['accelerator']}",
             "per-device memory:",
             f"  parameters        {_size(pd['params_bytes']):>12}",
             f"  optimizer state   {_size(pd['opt_state_bytes']):>12}",
             f"  temporaries       {_size(pd['temp_bytes']):>12}",
             f"  total             {_size(pd['total_bytes']):>12}  (arguments + outputs - donated + temporaries)",
             f"  {'fits' if r['fits'] else 'DOES NOT FIT'} in {_size(r['hbm_bytes'])}",
             "collectives (static count; result bytes on one device):"]
    for kind, v in r["collectives"].items():
        lines.append(f"  {kind:<19} {v['count']:>5}  {_size(v['bytes']):>12}")
    if r["replicated"]:
        from elmjax.sharding import Replicated, format_divisibility

        lines.append(format_divisibility([Replicated(**x) for x in r["replicated"]], r["mesh"]))
    f = r["flops_per_step"]
    lines.append(f"FLOPs per step: analytic {f['analytic']:.3e}, XLA {f['xla']:.3e} ({f['xla_per_device']:.3e} per device)")
    lines.append(f"compile: {r['compile_s']:.1f} s")
    e = r["estimate"]
    if e is None:
        lines.append(f"estimate: none for '{r['accelerator']}' (no published peak); pass --accelerator h100|h200|a100|v5e|v5p|v4")
    else:
        mfu = f"{100 * e['mfu_ceiling']:.1f}%" if e["mfu_ceiling"] is not None else "n/a"
        lines.append(f"estimate ({r['accelerator']} roofline): step {1e3 * e['step_s']:.2f} ms = max(compute "
                     f"{1e3 * e['compute_s']:.2f}, memory {1e3 * e['memory_s']:.2f}, communication "
                     f"{1e3 * e['comm_s']:.2f}) ms, {e['bound']}-bound (memory from {e['memory_basis']}); MFU ceiling {mfu}; "
                     f"{e['tokens_per_s']:,.0f} tokens/s")
    return "\n".join(lines)


def check_devices(n: int | None) -> None:
    """After ``force_host_devices``: JAX must really have ``n`` devices (it may have started earlier)."""
    import jax

    if n is not None and jax.device_count() != n:
        raise PreflightError(f"--devices {n}: JAX already started with {jax.device_count()} "
                             f"{jax.default_backend()} devices in this process; run preflight in a fresh process")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m elmjax.preflight", description=__doc__.splitlines()[0])
    p.add_argument("config", help="training config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.fsdp=8 mesh.data=1")
    p.add_argument("--devices", type=int, metavar="N", help="compile for N fake CPU devices")
    p.add_argument("--accelerator", choices=ACCELERATOR_NAMES,
                   help="hardware for the estimate and memory limit (default: this machine's, cpu if unknown)")
    p.add_argument("--hbm-gib", type=float, metavar="G", help="memory per device (default: the accelerator's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def default_accelerator() -> str:
    import jax

    from elmjax.roofline import detect

    return detect(jax.devices()[0].device_kind)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.devices is not None:
            force_host_devices(args.devices)  # before anything initialises JAX
        from elmjax import config_io
        from elmjax.config import Config

        config = config_io.load(Config, args.config, args.overrides)
        check_devices(args.devices)
        c = compile_step(config)
        r = report(config, c, args.accelerator or default_accelerator(), args.hbm_gib)
    except PreflightError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from elmjax.config_io import ConfigError

        if not isinstance(e, ConfigError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r) if args.json else format_report(r, args.config))
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
