"""Device mesh and the one table that maps logical axis names to mesh axes.

The mesh has axes (dcn_data, data, fsdp, tensor). Parameters are sharded FSDP-style
over ``fsdp`` along their ``embed`` dimension and Megatron-style over
``tensor`` along kv groups / FFN width / vocab; batches are split over
(dcn_data, data, fsdp). A dimension that a mesh axis does not divide (an odd head count,
a 259-token vocab) is replicated along that axis instead: always correct,
just less parallel. ``divisibility_report`` lists every such parameter with
the bytes it costs; training prints it before the first step.

Activations use the same names and the same table. The model marks them with
``constrain(x, ("batch", "length", "embed"))``, a no-op unless a step is
traced inside ``activation_sharding(mesh)``; inside, it pins the array to
the mesh (``jax.lax.with_sharding_constraint``). Without these pins GSPMD is
free to all-gather the token batch under FSDP and all-reduce the full logits.
A mesh axis is used at most once per array, first dimension first (as in
flax's ``logical_to_mesh_axes``): an activation [batch, length, embed] keeps
its batch on (data, fsdp) and its embed dimension whole, while a parameter
[vocab, embed] puts embed on fsdp.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from elmjax.config import MeshConfig
from elmjax.errors import UserError
from elmjax.model_config import ModelConfig

log = logging.getLogger(__name__)

MESH_AXES = ("dcn_data", "data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated),
# for parameters and activations alike.
LOGICAL_RULES: dict[str | None, str | tuple[str, ...] | None] = {
    "batch": ("dcn_data", "data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",  # query heads of an activation; whole kv groups when K divides tensor
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    None: None,
}


class MeshError(UserError):
    """The mesh does not fit the devices (a user error: the message names the mesh keys)."""


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int, int]:
    """(dcn_data, data, fsdp, tensor) sizes for ``num_devices`` devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh: at most one axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1) * cfg.dcn_data
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    total = math.prod(sizes) * cfg.dcn_data
    if total > num_devices:
        raise MeshError(f"mesh: dcn_data*data*fsdp*tensor = {total} but only {num_devices} devices are available")
    return (cfg.dcn_data, *sizes)


def _granules(devices) -> tuple[str, int]:
    """How the devices split over the slow network: ('slice_index', n) for TPU
    multi-slice, ('process_index', n) for several hosts, else ('', 1)."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if len(slices) > 1:
        return "slice_index", len(slices)
    processes = {d.process_index for d in devices}
    return ("process_index", len(processes)) if len(processes) > 1 else ("", 1)


def device_grid(cfg: MeshConfig, devices, process_count: int = 1) -> np.ndarray:
    """The devices arranged as a (dcn_data, data, fsdp, tensor) array.

    One slice: ``jax.make_mesh``'s topology-aware order (its devices, never a
    raw reshape). Several slices, or ``dcn_data`` > 1 across hosts:
    ``mesh_utils.create_hybrid_device_mesh`` with ``dcn_data`` over slices
    (or processes). A mesh smaller than the device count is fine on one host
    (tests run 1- and 8-device meshes side by side: the first devices are
    used) and an error on several, where every process must join the mesh."""
    devices = list(devices)
    shape = mesh_shape(cfg, len(devices))
    n = math.prod(shape)
    if n < len(devices):
        if process_count > 1:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))} covers {n} of {len(devices)} devices on "
                            f"{process_count} processes: every device must be in the mesh on multi-host runs "
                            "(use -1 for one axis to take the rest)")
        log.warning("mesh %s uses %d of %d devices", dict(zip(MESH_AXES, shape)), n, len(devices))
        devices = devices[:n]
    attr, granules = _granules(devices)
    if attr == "slice_index" and cfg.dcn_data != granules:
        raise MeshError(f"mesh: the devices span {granules} slices; set mesh.dcn_data={granules} "
                        f"(data parallel across slices), got {cfg.dcn_data}")
    if cfg.dcn_data > 1 and attr:
        if cfg.dcn_data != granules:
            raise MeshError(f"mesh.dcn_data={cfg.dcn_data} but the devices span {granules} processes; "
                            "dcn_data must equal the number of slices or hosts")
        return mesh_utils.create_hybrid_device_mesh((1, *shape[1:]), (cfg.dcn_data, 1, 1, 1), devices,
                                                    process_is_granule=attr == "process_index")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices).devices


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (dcn_data, data, fsdp, tensor) mesh over ``devices`` (default: all);
    see ``device_grid`` for how devices are placed."""
    devices = jax.devices() if devices is None else devices
    grid = device_grid(cfg, devices, jax.process_count())
    # Auto axes: GSPMD propagates shardings from the parameters, the batch and
    # the activation pins in ``constrain``.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh_shape: Mapping[str, int] | Mesh) -> P:
    """PartitionSpec for an array with logical ``axes``.

    A dimension keeps its rule's mesh axes only if they divide it and none of
    them is already taken by an earlier dimension; otherwise it is replicated.
    ``mesh_shape`` is a Mesh or a mapping axis name -> size."""
    sizes = mesh_shape.shape if isinstance(mesh_shape, Mesh) else mesh_shape
    spec, used = [], set()
    for name, dim in zip(axes, shape, strict=True):
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to LOGICAL_RULES")
        target = LOGICAL_RULES[name]
        mesh_axes = tuple(a for a in ((target,) if isinstance(target, str) else tuple(target or ())) if sizes.get(a, 1) > 1)
        if used.intersection(mesh_axes) or dim % math.prod(sizes[a] for a in mesh_axes):
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*spec)


_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("elmjax_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None):
    """Within this context (while tracing), ``constrain`` pins activations to ``mesh``."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing ``activation_sharding`` (None outside one)."""
    return _ACTIVATION_MESH.get()


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin activation ``x`` (logical ``axes``) to the active mesh; identity outside
    ``activation_sharding`` (one device: generation, scoring, HF interop)."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict:
    """Pure-dict tree of NamedShardings for the model's parameters."""
    out: dict = {}
    for path, var in nnx.to_flat_state(abstract_state):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            raise KeyError(f"parameter {'/'.join(map(str, path))} has no logical_axes metadata")
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh))
    return out


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"], *([None] * (rank - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_array(array: np.ndarray, sharding) -> jax.Array:
    """A global array from data every process holds in full."""
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def batch_divisor(mesh: Mesh) -> int:
    """Rows of a global batch must be a multiple of this (the batch's mesh axes)."""
    return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])


class Replicated(NamedTuple):
    """A parameter dimension its rule wanted split but the mesh axis does not divide."""

    param: str  # e.g. "layers/0/attn/qkv_DKCE"
    axis: str  # logical axis, e.g. "kv_heads"
    size: int  # that dimension's length
    mesh_axes: tuple[str, ...]  # what it would have been split over
    extra_bytes: int  # float32 parameter bytes per device beyond the split layout


def divisibility_report(model_cfg: ModelConfig, mesh_shape: Mapping[str, int]) -> list[Replicated]:
    """Parameters left (partly) replicated on a mesh of ``mesh_shape`` (axis -> size).

    ``extra_bytes`` counts the parameter alone; AdamW's two moments follow
    their parameter, so optimizer state adds twice as much again. An empty
    list means every rule applies: a clean tensor-parallel layout. Round
    layer-wise head counts with ``model.head_multiple`` = tensor to get one."""
    from elmjax.model import OpenELM  # the model imports this module's ``constrain``

    abstract = nnx.state(nnx.eval_shape(lambda: OpenELM(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    out = []
    for path, var in nnx.to_flat_state(abstract):
        axes = var.get_metadata()["logical_axes"]
        spec = logical_to_spec(axes, var.shape, mesh_shape)
        for name, dim, got in zip(axes, var.shape, spec):
            target = LOGICAL_RULES[name]
            wanted = tuple(a for a in ((target,) if isinstance(target, str) else tuple(target or ()))
                           if mesh_shape.get(a, 1) > 1)
            if wanted and got is None:
                nbytes = math.prod(var.shape) * var.dtype.itemsize
                split = math.prod(mesh_shape[a] for s in spec if s for a in ((s,) if isinstance(s, str) else s))
                ideal = split * math.prod(mesh_shape[a] for a in wanted)
                out.append(Replicated("/".join(map(str, path)), name, dim, wanted, nbytes // split - nbytes // ideal))
    return out


def format_divisibility(report: list[Replicated], mesh_shape: Mapping[str, int]) -> str:
    """A few readable lines for ``divisibility_report``'s result ('' when empty)."""
    if not report:
        return ""
    mesh = " ".join(f"{a}={n}" for a, n in mesh_shape.items() if n > 1)
    total = sum(r.extra_bytes for r in report)
    lines = [f"{len(report)} parameter dimension(s) do not divide the mesh ({mesh}) and stay replicated: "
             f"+{total / 2**20:.1f} MiB of parameters per device (+{3 * total / 2**20:.1f} MiB with AdamW moments)"]
    for r in report:
        lines.append(f"  {r.param}: {r.axis}={r.size} not divisible by {'*'.join(r.mesh_axes)}="
                     f"{math.prod(mesh_shape[a] for a in r.mesh_axes)} (+{r.extra_bytes / 2**20:.2f} MiB)")
    if any(r.axis == "kv_heads" for r in report):
        lines.append(f"  hint: model.head_multiple={mesh_shape.get('tensor', 1)} rounds every layer's kv heads to split evenly")
    return "\n".join(lines)
