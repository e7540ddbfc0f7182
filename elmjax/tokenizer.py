"""Tokenizers behind one small interface: byte-level, SentencePiece, Hugging Face.

``load_tokenizer(spec)`` takes the ``data.tokenizer`` string:

- ``'byte'`` (default, no files): ids 0..255 are the UTF-8 bytes, 256 = EOS,
  257 = BOS, 258 = PAD; vocab_size 259 (the default ``ModelConfig.vocab_size``).
- ``'sentencepiece:PATH'``: a SentencePiece ``.model`` file.
- ``'hf:PATH'``: a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library).

The two file-backed kinds import their library lazily, so the default install
(and everything that only uses bytes) never needs them; they come with the
``tokenizers`` extra: ``pip install 'elmjax[tokenizers]'``.

Every tokenizer has ``vocab_size``, ``eos_id``, ``encode(str) -> list[int]``,
``decode(ids) -> str`` and ``encode_many(texts) -> list[np.ndarray]`` (int32),
the batched form the data pipeline uses because it is much faster.
Pure numpy: importing this module never imports JAX.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np

from elmjax.config_io import atomic_write
from elmjax.errors import MissingExtraError, UserError

EXTRA_HINT = "pip install 'elmjax[tokenizers]'"
KINDS = ("byte", "sentencepiece:PATH", "hf:PATH")
# Special-token spellings tried, in order, when a tokenizer.json names no EOS.
_HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[EOS]", "<|im_end|>")


class TokenizerError(UserError):
    """A tokenizer spec or file is unusable; the message names the spec, the file and the reason."""


class Tokenizer(Protocol):
    spec: str
    vocab_size: int
    eos_id: int
    bos_id: int | None  # None: the tokenizer has no beginning-of-text token

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids; specials above 255. Encoding is a numpy view, no Python loop."""

    spec = "byte"
    vocab_size = 259
    eos_id = 256
    bos_id = 257
    pad_id = 258

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"byte tokenizer: ids must be in [0, {self.vocab_size}), got {arr.min()}..{arr.max()}")
        # Special tokens carry no text; invalid UTF-8 (a sequence cut mid-character) is shown as U+FFFD.
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, path: Path, spec: str):
        spm = _import("sentencepiece", spec)
        self.spec = spec
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:  # sentencepiece's C++ parser raises either
            raise TokenizerError(f"tokenizer '{spec}': cannot read {path} as a SentencePiece model: {e}") from e
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        if self.eos_id < 0:
            raise TokenizerError(
                f"tokenizer '{spec}': the SentencePiece model has no EOS piece (eos_id=-1); "
                "packing needs one to separate documents: train it with eos_id >= 0"
            )

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
    def __init__(self, path: Path, spec: str):
        tokenizers = _import("tokenizers", spec)
        self.spec = spec
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust error says what is wrong in the JSON
            raise TokenizerError(f"tokenizer '{spec}': cannot read {path} as a tokenizer.json: {e}") from e
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Ids can be sparse; the embedding table must cover the largest one.
        self.vocab_size = max(vocab.values()) + 1
        self.eos_id = _hf_eos_id(path, vocab, spec)
        self.bos_id = _hf_special_id(path, vocab, spec, "bos_token")

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _hf_special_id(path: Path, vocab: dict[str, int], spec: str, key: str) -> int | None:
    """The id of special token ``key`` ('eos_token', 'bos_token') named in a sibling tokenizer_config.json."""
    config = path.parent / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        token = json.loads(config.read_text()).get(key)
    except (OSError, ValueError, AttributeError) as e:
        raise TokenizerError(f"tokenizer '{spec}': cannot read {config}: {e}") from e
    if isinstance(token, dict):  # serialised AddedToken
        token = token.get("content")
    return vocab[token] if isinstance(token, str) and token in vocab else None


def _hf_eos_id(path: Path, vocab: dict[str, int], spec: str) -> int:
    """EOS from a sibling tokenizer_config.json if there is one, else a well-known spelling."""
    config = path.parent / "tokenizer_config.json"
    eos = _hf_special_id(path, vocab, spec, "eos_token")
    if eos is not None:
        return eos
    for token in _HF_EOS_CANDIDATES:
        if token in vocab:
            return vocab[token]
    raise TokenizerError(
        f"tokenizer '{spec}': found no end-of-text token (tried eos_token in {config.name} and "
        f"{', '.join(_HF_EOS_CANDIDATES)}); packing needs one to separate documents: add one as a special token"
    )


def _import(module: str, spec: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"tokenizer '{spec}' needs the '{module}' library, which is not installed: {EXTRA_HINT}"
        ) from e


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by ``spec`` ('byte', 'sentencepiece:PATH' or 'hf:PATH')."""
    if spec == "byte":
        return ByteTokenizer()
    kind, sep, raw_path = spec.partition(":")
    classes = {"sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}
    if not sep or kind not in classes:
        raise TokenizerError(f"unknown tokenizer '{spec}': expected one of {', '.join(KINDS)}")
    if not raw_path:
        raise TokenizerError(f"tokenizer '{spec}': missing the file path after '{kind}:'")
    path = Path(raw_path).expanduser()
    if not path.is_file():
        raise TokenizerError(f"tokenizer '{spec}': file not found: {path}")
    return classes[kind](path, spec)


def tokenizer_file(spec: str) -> Path | None:
    """The file behind a spec (None for 'byte'); lets caches notice when it changes."""
    kind, sep, raw_path = spec.partition(":")
    return Path(raw_path).expanduser() if sep and raw_path else None


# The file names a tokenizer's file gets when it is saved next to data or
# weights: the Hugging Face Hub's names, which tokenizer lookups search for.
TOKENIZER_FILES = {"sentencepiece": "tokenizer.model", "hf": "tokenizer.json"}


def copy_tokenizer_files(spec: str, directory: str | Path) -> str | None:
    """Copy the file behind ``spec`` into ``directory`` under its Hub name (plus
    a sibling tokenizer_config.json, which names HF special tokens); the name of
    the copy, or None for 'byte' (no file)."""
    src = tokenizer_file(spec)
    if src is None:
        return None
    name = TOKENIZER_FILES[spec.partition(":")[0]]
    files = {name: src}
    if (src.parent / "tokenizer_config.json").is_file():
        files["tokenizer_config.json"] = src.parent / "tokenizer_config.json"
    for target, source in files.items():
        atomic_write(Path(directory) / target, lambda tmp, source=source: shutil.copyfile(source, tmp))
    return name
