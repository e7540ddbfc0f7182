"""Documents for the data pipeline (stdlib sources, text, JSONL, Parquet) and their packing.

A source yields ``Document``s in a deterministic order (sorted files, file
order within a file). Each document carries a ``split_key`` whose stable hash
decides train vs validation, so the split of one document never depends on
which other documents exist: adding files never moves others across the split.
For the stdlib corpus the key is the file's path relative to the stdlib root;
for user data it is the text itself (so exact duplicates share a split).

Packing: tokenized documents are concatenated with EOS after each one and cut
into rows of ``seq_len + 1`` tokens with a stride of ``seq_len`` (consecutive
rows share one token), so ``inputs = row[:-1]``, ``targets = row[1:]``
predict every token of the stream exactly once. The in-memory pipeline and
``prepare`` use the same functions, so both give identical rows.

Pure Python + numpy (+ pyarrow for Parquet, imported lazily): no JAX.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from elmjax.errors import UserError

if TYPE_CHECKING:
    from elmjax.config import DataConfig

# Directory names skipped in the stdlib walk: third-party packages are not the
# stdlib (and vary by machine), test suites are large and repetitive.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_GLOB_CHARS = set("*?[")
_ENCODE_CHUNK = 256  # documents per batched tokenizer call


class DataError(UserError):
    """Bad or missing data; the message names the file (and line/field) and the reason."""


@dataclass(frozen=True)
class Document:
    text: str
    split_key: str


def is_validation(split_key: str, val_fraction: float) -> bool:
    """Stable (process- and machine-independent) hash split: blake2b, not Python's salted hash()."""
    digest = hashlib.blake2b(split_key.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < val_fraction


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every stdlib *.py file, sorted by relative path."""
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into site-packages (large and slow to walk).
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    if not found:
        raise DataError(f"source 'stdlib': no *.py files found under {root}")
    return found


def resolve_paths(patterns: Sequence[str]) -> list[Path]:
    """Expand files/globs in order (each glob's matches sorted), dropping repeats."""
    out: dict[Path, None] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if _GLOB_CHARS & set(expanded):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data.paths: no files match the glob '{pattern}'")
        else:
            if not os.path.exists(expanded):
                raise DataError(f"data.paths: file not found: '{pattern}'")
            matches = [expanded]
        for m in matches:
            out.setdefault(Path(m), None)
    return list(out)


def iter_documents(
    source: str, paths: Sequence[str], text_field: str = "text", max_documents: int | None = None
) -> Iterator[Document]:
    """Non-empty documents of a source, in deterministic order, at most ``max_documents``."""
    if source == "stdlib":
        if paths:
            raise DataError("data.paths is not used with data.source 'stdlib': remove it or pick another source")
        docs = _stdlib_documents()
    else:
        readers = {"text": _text_documents, "jsonl": _jsonl_documents, "parquet": _parquet_documents}
        if source not in readers:
            raise DataError(f"data.source '{source}' has no documents (expected stdlib, text, jsonl or parquet)")
        docs = (d for f in resolve_paths(paths) for d in readers[source](f, text_field))
    count = 0
    for doc in docs:
        if max_documents is not None and count >= max_documents:
            return
        if doc.text:
            count += 1
            yield doc


def _stdlib_documents() -> Iterator[Document]:
    for rel, path in stdlib_files():
        # A stray non-UTF-8 byte must not stop a quickstart; the replacement char is harmless.
        yield Document(path.read_bytes().decode("utf-8", errors="replace"), rel)


def _text_documents(path: Path, text_field: str) -> Iterator[Document]:
    del text_field  # a whole text file is one document
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    yield Document(text, text)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{lineno}: no text field '{text_field}' (found {keys}); set data.text_field")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field '{text_field}' is {type(text).__name__}, not a string")
            if "\\u" in line:  # only JSON escapes can smuggle in unpaired surrogates (not encodable)
                _check_unicode(text, f"{path}:{lineno}")
            yield Document(text, text)


def _check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: text is not valid Unicode ({e.reason} at character {e.start})") from e


def _parquet_documents(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq  # lazy: only parquet users pay the import

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataError(f"{path}: cannot read as Parquet: {e}") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column '{text_field}' (columns: {names}); set data.text_field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path}: row {row}: column '{text_field}' is {type(text).__name__}, not a string")
            row += 1
            if text:
                yield Document(text, text)


# ---------------------------------------------------------------- tokenize + pack


def tokenized_documents(cfg: DataConfig, tokenizer, progress=None) -> Iterator[tuple[bool, np.ndarray, int]]:
    """(is_validation, token ids, UTF-8 bytes) per document, in corpus order."""
    docs = iter_documents(cfg.source, cfg.paths, cfg.text_field, cfg.max_documents)
    while chunk := list(itertools.islice(docs, _ENCODE_CHUNK)):
        # Batched encoding: one call per chunk lets Rust/C++ tokenizers amortise their overhead.
        for d, ids in zip(chunk, tokenizer.encode_many([d.text for d in chunk])):
            yield is_validation(d.split_key, cfg.val_fraction), ids, len(d.text.encode("utf-8"))
        if progress is not None:
            progress.update(len(chunk))


def concat_with_eos(docs: Sequence[np.ndarray], eos_id: int) -> np.ndarray:
    """One int32 stream: each document followed by EOS."""
    lengths = np.array([len(doc) for doc in docs], dtype=np.int64)
    tokens = np.full(int(lengths.sum()) + len(docs), eos_id, dtype=np.int32)
    starts = np.cumsum(lengths + 1) - 1 - lengths
    for doc, s in zip(docs, starts):
        tokens[s : s + len(doc)] = doc
    return tokens


def token_bytes(lengths: Sequence[int], nbytes: Sequence[int]) -> np.ndarray:
    """UTF-8 bytes each token of ``concat_with_eos`` stands for (float64, same length).

    A document's bytes are spread evenly over its tokens (exact for the byte
    tokenizer; for subword tokenizers sums over whole documents are exact and
    partial sums a close estimate) and EOS stands for none.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    per_token = np.divide(np.asarray(nbytes, dtype=np.float64), lengths,
                          out=np.zeros(len(lengths)), where=lengths > 0)
    # Interleave (per-token bytes x length, 0 x 1) per document: weights in stream order.
    values = np.stack([per_token, np.zeros(len(lengths))], 1).ravel()
    return np.repeat(values, np.stack([lengths, np.ones_like(lengths)], 1).ravel())


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Read-only view [n, seq_len + 1] of the stream with stride seq_len (n = (len - 1) // seq_len)."""
    n = max(0, (len(tokens) - 1) // seq_len)
    tokens = np.ascontiguousarray(tokens)
    step = tokens.strides[0]
    return np.lib.stride_tricks.as_strided(
        tokens, shape=(n, seq_len + 1), strides=(seq_len * step, step), writeable=False
    )


def row_target_bytes(weights: np.ndarray, seq_len: int, rows: int) -> np.ndarray:
    """Bytes behind the targets (positions 1..seq_len) of each of the first ``rows`` packed rows."""
    cum = np.concatenate([[0.0], np.cumsum(weights, dtype=np.float64)])
    first = np.arange(rows) * seq_len + 1
    return cum[first + seq_len] - cum[first]


def file_signature(paths: Sequence[Path]) -> tuple:
    """(path, size, mtime) of each file: a cheap cache key that changes when the data does."""
    sig = []
    for p in paths:
        st = os.stat(p)
        sig.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(sig)
