"""Collectives in an optimized HLO module (``compiled.as_text()``), by kind.

Counts are static: an op inside a while loop (a ``grad_accum`` scan) is
counted once, not once per iteration. Bytes are the op's result shape on one
device (tuple results summed): for all-gather the gathered array, for
reduce-scatter the scattered shard, for all-reduce the reduced array.

Asynchronous collectives appear as a ``-start``/``-done`` pair (and
reduce-scatter/all-to-all as ``async-start`` wrapping a computation that
holds the plain op): only the ``-done`` op, or the plain op inside the
wrapped computation, is counted, so a pair is never counted twice. The
``-start`` result is a tuple of (operands, outputs, scratch) and would
inflate the bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# bytes per element of HLO primitive types (sub-byte types rounded up: they are rare in collectives)
_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1,
    "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
}

# "%name = SHAPE op(" where op is a collective, optionally with -start/-done
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(?P<phase>-start|-done)?"
    r"\(%?(?P<operand>[\w.\-]*)"
)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{(\{[0-9,]*\})")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


@dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int  # result bytes on one device
    group_size: int  # devices taking part in one group (1 when unknown)


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: an array ``f32[8,128]{1,0}`` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(_COMMENT.sub("", shape)):
        if dtype not in _DTYPE_BYTES:
            continue  # token[], opaque: no payload
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def group_size(line: str) -> int:
    """Size of one replica group, in any of the three textual forms XLA prints."""
    m = _EXPLICIT_GROUPS.search(line)
    if m:
        return len([x for x in m.group(1).strip("{}").split(",") if x])
    m = _IOTA_GROUPS.search(line)
    if m:  # [groups, size]<=[...]: the last dimension is the group
        return int(m.group(1).split(",")[-1])
    m = _MESH_GROUPS.search(line)
    if m:  # mesh['axis_0'=8,'axis_1'=2] {'axis_0'}: the named axes form a group
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        named = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes[a]) for a in named if a in sizes)
    if "source_target_pairs=" in line:
        return 2
    return 1


def parse_collectives(hlo_text: str) -> list[Collective]:
    out = []
    started: dict[str, int] = {}  # -start op name -> its group size (the -done line has no groups)
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if m is None:
            continue
        if m.group("phase") == "-start":
            started[m.group("name")] = group_size(line)
            continue
        n = started.get(m.group("operand"), 1) if m.group("phase") == "-done" else group_size(line)
        out.append(Collective(m.group("op"), shape_bytes(m.group("shape")), n))
    return out


def summarize(collectives: list[Collective]) -> dict[str, dict[str, int]]:
    """kind -> {count, bytes, max_bytes}, every kind present (zeros included) in a fixed order.

    ``max_bytes`` (the largest single op) tells a logits-sized all-reduce from many small ones."""
    out = {k: {"count": 0, "bytes": 0, "max_bytes": 0} for k in KINDS}
    for c in collectives:
        out[c.kind]["count"] += 1
        out[c.kind]["bytes"] += c.bytes
        out[c.kind]["max_bytes"] = max(out[c.kind]["max_bytes"], c.bytes)
    return out


def wire_bytes(c: Collective) -> float:
    """Bytes one device sends for ``c`` with ring algorithms (the bandwidth term only).

    all-gather and all-to-all send (n-1)/n of the result, reduce-scatter
    (n-1) shards, all-reduce twice (n-1)/n (reduce-scatter + all-gather), a
    collective-permute its whole result."""
    n = max(c.group_size, 1)
    if c.kind in ("all-gather", "all-to-all"):
        return c.bytes * (n - 1) / n
    if c.kind == "reduce-scatter":
        return c.bytes * (n - 1)
    if c.kind == "all-reduce":
        return 2 * c.bytes * (n - 1) / n
    return float(c.bytes)
