"""Device mesh and the one table that maps logical axis names to mesh axes.

The mesh has axes (data, fsdp, tensor). Parameters are sharded FSDP-style
over ``fsdp`` along their ``embed`` dimension and Megatron-style over
``tensor`` along heads / FFN width / vocab; batches are split over
(data, fsdp). A dimension that a mesh axis does not divide (an odd head count,
a 259-token vocab) is replicated along that axis instead: always correct,
just less parallel, and reported once in the log.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from elmjax.config import MeshConfig
from elmjax.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: dict[str | None, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "qkv_heads": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    None: None,
}


class MeshError(UserError):
    """The mesh does not fit the devices (a user error: the message names the mesh keys)."""


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh: at most one axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) > num_devices:
        raise MeshError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but only {num_devices} devices are available")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all).

    A mesh smaller than the device count uses the first devices, so one
    process can run a 1-device and an 8-device configuration side by side."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    n = math.prod(shape)
    if n < len(devices):
        log.warning("mesh %s uses %d of %d devices", dict(zip(MESH_AXES, shape)), n, len(devices))
    grid = np.asarray(devices[:n], dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for a parameter, dropping mesh axes that don't divide its dims."""
    spec = []
    for name, dim in zip(axes, shape):
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to LOGICAL_RULES")
        target = LOGICAL_RULES[name]
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and dim % size:
            if size > 1:
                log.info("replicating %s (size %d) over %s: not divisible by %d", name, dim, mesh_axes, size)
            mesh_axes = ()
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*spec)


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


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
