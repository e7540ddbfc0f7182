"""Training and validation data: tokenize, pack, shuffle, shard across hosts, checkpoint.

Documents are read, tokenized and packed into rows of ``seq_len + 1`` tokens
by ``elmjax.corpus`` (inputs = row[:-1], targets = row[1:]).

Training rows go through a grain ``MapDataset``: shuffle(seed) -> repeat
(reshuffled each epoch) -> batch. Host ``p`` of ``P`` reads local batch
``k*P + p`` of size ``batch_size // P``, which is exactly its slice of global
batch ``k``, so the order depends only on (data, seed, batch_size), never on
the model or the number of hosts. The iterator state is the global step index
(JSON), so it is portable across host counts.

Sources 'stdlib', 'text', 'jsonl', 'parquet' are tokenized in memory once per
process (cached); 'arrayrecord' reads rows packed ahead of time by
``python -m elmjax.data prepare`` (``prepare`` below): ArrayRecord shards of
train and validation rows plus a JSON manifest.

No JAX here: numpy + grain only, and grain (which itself imports JAX) is
imported only when a training iterator is built, so tokenizing, ``prepare``
and the validation set stay light.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from elmjax.config import DataConfig
from elmjax.corpus import (
    DataError, concat_with_eos, file_signature, pack, resolve_paths, row_target_bytes, token_bytes, tokenized_documents,
)
from elmjax.tokenizer import copy_tokenizer_files, load_tokenizer, tokenizer_file

MANIFEST = "manifest.json"
FORMAT = "elmjax.packed/1"
ROW_BYTES = "row_bytes.npy"  # per validation row: UTF-8 bytes behind its targets


@dataclass(frozen=True, eq=False)
class ValidationSet:
    """The fixed held-out rows. Same for every run with the same data config, whatever the batch size."""

    tokens: np.ndarray  # int32 [val_sequences, seq_len + 1], read-only
    row_bytes: np.ndarray  # float64 [val_sequences]: UTF-8 bytes behind each row's targets
    bytes_per_token: float  # row_bytes.sum() / number of target tokens; bpb = bits_per_token / this


# ---------------------------------------------------------------- in-memory sources


@dataclass(frozen=True, eq=False)
class _Streams:
    train: np.ndarray
    val: np.ndarray
    val_weights: np.ndarray
    train_documents: int
    val_documents: int


def _in_memory_streams(cfg: DataConfig) -> _Streams:
    if cfg.source == "stdlib":
        signature: tuple = ()
    else:
        signature = file_signature(resolve_paths(cfg.paths))
    tok_file = tokenizer_file(cfg.tokenizer)
    if tok_file is not None and tok_file.is_file():
        signature += file_signature([tok_file])
    key = (cfg.source, tuple(cfg.paths), cfg.text_field, cfg.tokenizer, cfg.val_fraction, cfg.max_documents)
    return _cached_streams(key, signature)


@functools.lru_cache(maxsize=2)
def _cached_streams(key: tuple, signature: tuple) -> _Streams:
    # ``signature`` (file sizes and mtimes) only invalidates the cache when the data changes.
    source, paths, text_field, tokenizer_spec, val_fraction, max_documents = key
    cfg = DataConfig(source=source, paths=paths, text_field=text_field, tokenizer=tokenizer_spec,
                     val_fraction=val_fraction, max_documents=max_documents)
    tok = load_tokenizer(tokenizer_spec)
    docs: dict[bool, list[np.ndarray]] = {False: [], True: []}
    val_bytes = []
    for is_val, ids, nbytes in tokenized_documents(cfg, tok):
        docs[is_val].append(ids)
        if is_val:
            val_bytes.append(nbytes)
    val_weights = token_bytes([len(d) for d in docs[True]], val_bytes)
    train, val = concat_with_eos(docs[False], tok.eos_id), concat_with_eos(docs[True], tok.eos_id)
    return _Streams(train, val, val_weights, len(docs[False]), len(docs[True]))


def _too_small(cfg: DataConfig, split: str, found_tokens: int, rows_needed: int, what: str) -> DataError:
    need = rows_needed * cfg.seq_len + 1
    cap = f"raise data.max_documents (now {cfg.max_documents}), " if cfg.max_documents is not None else ""
    return DataError(
        f"data.source '{cfg.source}': the {split} split has {found_tokens} tokens but {what} needs {need} "
        f"({rows_needed} rows of seq_len {cfg.seq_len} + 1); add data, {cap}or lower data.seq_len"
    )


# ---------------------------------------------------------------- ArrayRecord (pre-packed)


@dataclass(frozen=True, eq=False)
class _PackedDirs:
    manifest: dict
    train_files: list[str]
    val_files: list[str]
    val_row_bytes: np.ndarray
    tokenizer: str  # the spec of the tokenizer the rows were made with


def _packed_dirs(cfg: DataConfig) -> _PackedDirs:
    dirs = []
    for pattern in cfg.paths:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded)) if set("*?[") & set(expanded) else [expanded]
        if not matches or not os.path.exists(matches[0]):
            raise DataError(f"data.paths: nothing matches '{pattern}'")
        for m in map(Path, matches):
            d = m.parent if m.name == MANIFEST else m
            if not (d / MANIFEST).is_file():
                raise DataError(f"data.paths: '{m}' is not a directory written by "
                                f"`python -m elmjax.data prepare` (no {MANIFEST})")
            dirs.append(d)
    manifests = [_read_manifest(d, cfg) for d in dirs]
    first = manifests[0]
    for d, m in zip(dirs[1:], manifests[1:]):
        for k in ("tokenizer", "vocab_size", "eos_id", "dtype"):
            if m[k] != first[k]:
                raise DataError(f"{d / MANIFEST}: {k} {m[k]!r} differs from {dirs[0] / MANIFEST} ({first[k]!r})")
    used = _packed_tokenizer(dirs[0], first)
    if cfg.tokenizer not in (first["tokenizer"], used):
        # One fixed call site, so Python's default filter shows it once per process.
        warnings.warn(f"data.tokenizer '{cfg.tokenizer}' is not the prepared data's '{first['tokenizer']}': "
                      f"the data is already tokenized, so '{used}' is the tokenizer used "
                      "(elmjax.train records it in the run's config.yaml)", stacklevel=1)
    shards = {s: [str(d / s / f) for d, m in zip(dirs, manifests) for f in m["splits"][s]["shards"]]
              for s in ("train", "validation")}
    row_bytes = np.concatenate([np.load(d / "validation" / ROW_BYTES) for d in dirs])
    return _PackedDirs(first, shards["train"], shards["validation"], row_bytes, used)


def _packed_tokenizer(d: Path, manifest: dict) -> str:
    """The spec of the tokenizer the data was packed with: its copy inside the
    packed directory when prepare saved one, else the spec prepare was given."""
    copy = manifest.get("tokenizer_file")
    if not copy:
        return manifest["tokenizer"]
    return f"{manifest['tokenizer'].partition(':')[0]}:{(d / copy).resolve()}"


def _read_manifest(d: Path, cfg: DataConfig) -> dict:
    path = d / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the manifest: {e}") from e
    if m.get("format") != FORMAT:
        raise DataError(f"{path}: format {m.get('format')!r} is not {FORMAT!r}; re-run prepare")
    if m["seq_len"] != cfg.seq_len:
        raise DataError(f"{path}: the data was packed with seq_len {m['seq_len']} but data.seq_len is {cfg.seq_len}; "
                        f"set data.seq_len={m['seq_len']} or re-run prepare with --seq-len {cfg.seq_len}")
    return m


@dataclass(frozen=True)
class _DecodeRow:
    dtype: str  # the manifest's on-disk dtype (little-endian uint16 or int32)

    def __call__(self, record: bytes) -> np.ndarray:
        return np.frombuffer(record, dtype=np.dtype(self.dtype)).astype(np.int32)


def _array_records(files: list[str]):
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    return ArrayRecordDataSource(files)


# ---------------------------------------------------------------- public interface


class TrainIterator:
    """Iterator over local batches with a JSON state: the grain state plus what it is valid for."""

    def __init__(self, it, identity: dict):
        self._it = it
        self._identity = identity

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return next(self._it)

    def get_state(self) -> dict:
        return {"grain": self._it.get_state(), "data": dict(self._identity)}

    def set_state(self, state: dict) -> None:
        saved = state.get("data", {})
        if saved != self._identity:
            diff = {k: (saved.get(k), v) for k, v in self._identity.items() if saved.get(k) != v}
            raise DataError(f"cannot resume the data iterator: the saved state is for different data "
                            f"(saved vs now: {diff}); resume with the same data config")
        self._it.set_state(state["grain"])


def train_iterator(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """Endless iterator of int32 [batch_size // process_count, seq_len + 1]: this host's rows of each global batch."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size {cfg.batch_size} is not divisible by the {process_count} processes")
    import grain  # lazily: grain imports JAX

    if cfg.source == "arrayrecord":
        packed = _packed_dirs(cfg)
        source = grain.sources.ArrayRecordDataSource(packed.train_files)
        ds = grain.MapDataset.source(source).map(_DecodeRow(packed.manifest["dtype"]))
        rows, tokens = len(source), len(source) * cfg.seq_len + 1
        read = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
    else:
        streams = _in_memory_streams(cfg)
        table = pack(streams.train, cfg.seq_len)
        ds = grain.MapDataset.source(table)
        rows, tokens = len(table), len(streams.train)
        # In-memory rows are a numpy slice away: prefetch threads would only add overhead.
        read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    if rows < cfg.batch_size:
        raise _too_small(cfg, "train", tokens, cfg.batch_size, f"one batch of {cfg.batch_size}")
    local = cfg.batch_size // process_count
    ds = ds.shuffle(seed=cfg.seed).repeat(None).batch(local, drop_remainder=True)
    # Local batch k*P + p holds rows [p*local, (p+1)*local) of global batch k.
    ds = ds[process_index::process_count]
    identity = {"seed": cfg.seed, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "rows": rows}
    return TrainIterator(iter(ds.to_iter_dataset(read)), identity)


def validation_set(cfg: DataConfig) -> ValidationSet:
    """The first ``val_sequences`` packed rows of the validation split, with their byte counts."""
    return _held_out(cfg, 0, cfg.val_sequences, "data.val_sequences")


def test_set(cfg: DataConfig) -> ValidationSet | None:
    """The ``test_sequences`` packed rows right after the validation rows (None when ``test_sequences`` is 0).

    Taken from the same held-out documents, after the validation rows, so
    train and validation data stay exactly what they are without a test
    split, and no target token is shared between them (packed rows overlap
    by one input token, as consecutive training rows do).
    """
    if not cfg.test_sequences:
        return None
    return _held_out(cfg, cfg.val_sequences, cfg.test_sequences, "data.val_sequences + data.test_sequences")


def _held_out(cfg: DataConfig, start: int, count: int, key: str) -> ValidationSet:
    end = start + count
    if cfg.source == "arrayrecord":
        packed = _packed_dirs(cfg)
        source = _array_records(packed.val_files)
        if len(source) < end:
            raise _too_small(cfg, "validation", len(source) * cfg.seq_len + 1, end, key)
        decode = _DecodeRow(packed.manifest["dtype"])
        tokens = np.stack([decode(source[i]) for i in range(start, end)])
        row_bytes = packed.val_row_bytes[start:end].astype(np.float64)
    else:
        streams = _in_memory_streams(cfg)
        table = pack(streams.val, cfg.seq_len)
        if len(table) < end:
            raise _too_small(cfg, "validation", len(streams.val), end, key)
        tokens = np.array(table[start:end], dtype=np.int32)
        row_bytes = row_target_bytes(streams.val_weights, cfg.seq_len, end)[start:]
    tokens.setflags(write=False)
    row_bytes.setflags(write=False)
    bpt = float(row_bytes.sum() / (count * cfg.seq_len))
    return ValidationSet(tokens=tokens, row_bytes=row_bytes, bytes_per_token=bpt)


def vocab_size(cfg: DataConfig) -> int:
    if cfg.source == "arrayrecord":
        return int(_packed_dirs(cfg).manifest["vocab_size"])
    return load_tokenizer(cfg.tokenizer).vocab_size


def tokenizer_spec(cfg: DataConfig) -> str:
    """The tokenizer the data really uses: ``data.tokenizer``, except for
    prepared data, whose rows were tokenized by ``prepare``."""
    if cfg.source == "arrayrecord":
        return _packed_dirs(cfg).tokenizer
    return cfg.tokenizer


def batch_fingerprint(batch: np.ndarray) -> str:
    """16 hex chars identifying a batch's shape and values (integers hash alike whatever their width)."""
    arr = np.asarray(batch)
    if arr.dtype.kind in "iub":
        arr = arr.astype("<i8")
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- prepare: pack to ArrayRecord


class _ShardWriter:
    """Packs one split's documents into rows and writes them to numbered ArrayRecord shards."""

    _FLUSH_TOKENS = 1 << 22  # pack and write whenever this many tokens are buffered

    def __init__(self, directory: Path, seq_len: int, dtype: np.dtype, shard_size: int, eos_id: int):
        self.dir, self.seq_len, self.dtype, self.shard_size, self.eos_id = directory, seq_len, dtype, shard_size, eos_id
        self.dir.mkdir(parents=True)
        self.docs: list[np.ndarray] = []
        self.nbytes: list[int] = []
        self.buffered = 0
        self.carry = (np.zeros(0, np.int32), np.zeros(0))  # stream tail not yet in a full row
        self.writer = None
        self.shards: list[str] = []
        self.row_bytes: list[np.ndarray] = []
        self.stats = {"documents": 0, "tokens": 0, "bytes": 0, "rows": 0}

    def add(self, ids: np.ndarray, nbytes: int) -> None:
        self.docs.append(ids)
        self.nbytes.append(nbytes)
        self.buffered += len(ids) + 1
        self.stats["documents"] += 1
        self.stats["tokens"] += len(ids) + 1
        self.stats["bytes"] += nbytes
        if self.buffered >= self._FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        tokens = np.concatenate([self.carry[0], concat_with_eos(self.docs, self.eos_id)])
        weights = np.concatenate([self.carry[1], token_bytes([len(d) for d in self.docs], self.nbytes)])
        self.docs, self.nbytes, self.buffered = [], [], 0
        rows = pack(tokens, self.seq_len)
        self.row_bytes.append(row_target_bytes(weights, self.seq_len, len(rows)))
        # The last row's final token is also the next row's first one (stride seq_len).
        cut = len(rows) * self.seq_len
        self.carry = (tokens[cut:], weights[cut:])
        for row in rows.astype(self.dtype):
            if self.writer is None or self.stats["rows"] % self.shard_size == 0:
                self._next_shard()
            self.writer.write(row.tobytes())
            self.stats["rows"] += 1

    def _next_shard(self) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is not None:
            self.writer.close()
        name = f"shard-{len(self.shards):05d}.array_record"
        # group_size:1 keeps every record individually addressable: fast random access for the global shuffle.
        self.writer = ArrayRecordWriter(str(self.dir / name), "group_size:1")
        self.shards.append(name)

    def close(self) -> dict:
        self._flush()
        if self.writer is not None:
            self.writer.close()
        row_bytes = np.concatenate(self.row_bytes)
        targets = self.stats["rows"] * self.seq_len
        return {**self.stats, "shards": self.shards, "row_bytes": row_bytes,
                "bytes_per_token": float(row_bytes.sum() / targets) if targets else 0.0}


def prepare(cfg: DataConfig, out: str | os.PathLike, *, shard_size: int = 65536, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Tokenize and pack ``cfg``'s corpus into ``out``/{train,validation}/*.array_record + manifest.json.

    Written to a temporary sibling directory and renamed at the end, so ``out``
    is either complete or absent. Returns the manifest.
    """
    from tqdm import tqdm

    out = Path(out).expanduser()
    if cfg.source == "arrayrecord":
        raise DataError("prepare reads documents: --source must be stdlib, text, jsonl or parquet")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: is a file; prepare writes a directory there")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    tok = load_tokenizer(cfg.tokenizer)
    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<i4")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not mkdtemp's 0700) so the result has the user's usual permissions.
    tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        writers = {s: _ShardWriter(tmp / s, cfg.seq_len, dtype, shard_size, tok.eos_id)
                   for s in ("train", "validation")}
        with tqdm(desc=f"prepare {cfg.source}", unit="doc", disable=not progress) as bar:
            for is_val, ids, nbytes in tokenized_documents(cfg, tok, progress=bar):
                writers["validation" if is_val else "train"].add(ids, nbytes)
        splits = {s: w.close() for s, w in writers.items()}
        for s, stats in splits.items():
            if stats["rows"] == 0:
                raise _too_small(cfg, s, stats["tokens"], 1, "one row")
        np.save(tmp / "validation" / ROW_BYTES, splits["validation"].pop("row_bytes"))
        splits["train"].pop("row_bytes")
        manifest = {
            "format": FORMAT, "seq_len": cfg.seq_len, "tokenizer": cfg.tokenizer, "vocab_size": tok.vocab_size,
            # The tokenizer's file travels with the data, so a run trained on it can record and reuse it.
            "tokenizer_file": copy_tokenizer_files(cfg.tokenizer, tmp),
            "eos_id": tok.eos_id, "dtype": dtype.str,
            "bytes_per_token": splits["validation"]["bytes_per_token"],
            "source": {"source": cfg.source, "paths": list(cfg.paths), "text_field": cfg.text_field,
                       "val_fraction": cfg.val_fraction, "max_documents": cfg.max_documents},
            "splits": splits,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_dir(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / "data")
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m elmjax.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize and pack a corpus into ArrayRecord shards (for source=arrayrecord)")
    p.add_argument("--source", default="stdlib", choices=["stdlib", "text", "jsonl", "parquet"])
    p.add_argument("--paths", nargs="*", default=[], help="files or globs (quote globs)")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument("--tokenizer", default="byte", help="'byte', 'sentencepiece:PATH' or 'hf:PATH'")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--shard-size", type=int, default=65536, help="rows per ArrayRecord shard")
    p.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = DataConfig(source=args.source, paths=tuple(args.paths), text_field=args.text_field,
                         tokenizer=args.tokenizer, seq_len=args.seq_len, val_fraction=args.val_fraction,
                         max_documents=args.max_documents)
        m = prepare(cfg, args.out, shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, OSError, ImportError) as e:
        parser.exit(2, f"error: {e}\n")
    s = m["splits"]
    print(f"wrote {args.out}: train {s['train']['rows']} rows, validation {s['validation']['rows']} rows "
          f"of {m['seq_len'] + 1} tokens; validation bytes/token {m['bytes_per_token']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
