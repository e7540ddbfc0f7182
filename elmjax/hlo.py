"""Collectives in compiled (optimized) HLO text, by kind, with their bytes.

``collectives(jax.jit(f).lower(...).compile().as_text())`` answers "what
does this step send between devices": the sharding tests assert on it and
the preflight report prints it. Bytes are the result shape of each op (for a
tuple-shaped, combined collective, the sum over its parts), per device.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
# "%name = SHAPE kind(" or the async "kind-start(" form; SHAPE may be a tuple.
_OP = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(KINDS) + r")(-start)?\(", re.M)
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


class Collective(NamedTuple):
    kind: str
    bytes: int  # result bytes on one device
    largest: int  # bytes of the largest single array in the result


def parse(hlo_text: str) -> list[Collective]:
    out = []
    for m in _OP.finditer(hlo_text):
        shape, kind, is_async = m.group(1), m.group(2), bool(m.group(3))
        arrays = _ARRAY.findall(shape)
        if is_async and kind in ("all-gather", "collective-permute"):
            # Their async "-start" results are (operands, results[, sync flags]):
            # count the results only.
            arrays = [a for a in arrays if a[1]]
            arrays = arrays[len(arrays) // 2:]
        sizes = [_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in arrays]
        out.append(Collective(kind, sum(sizes), max(sizes, default=0)))
    return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """kind -> {count, bytes, largest} for every kind in ``KINDS`` (zeros included)."""
    table = {k: {"count": 0, "bytes": 0, "largest": 0} for k in KINDS}
    for c in parse(hlo_text):
        row = table[c.kind]
        row["count"] += 1
        row["bytes"] += c.bytes
        row["largest"] = max(row["largest"], c.largest)
    return table
