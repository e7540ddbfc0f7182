"""Chat / instruction JSONL -> packed rows with loss weights and segment ids.

Each line is one example, either ``{"messages": [{"role", "content"}, ...]}``
(roles system | user | assistant, at least one assistant message with
non-empty content) or ``{"prompt": str, "completion": str}`` (a user and an
assistant message). A malformed line is reported with its file, line number
and reason; with more than ``sft.max_invalid`` of them the run stops, listing
them; otherwise they are dropped, logged and counted.

Each example is rendered with the chat template (``elmjax.chat_template``),
tokenized span by span, and ends with EOS (``sft.add_eos``; trained when the
conversation ends with the assistant, so the model learns to stop). One
longer than ``data.seq_len + 1`` tokens is dropped or cut
(``sft.truncation``). Examples are packed greedily, in a seeded order, into
rows of ``seq_len + 1`` tokens; a row is int32 [4, seq_len + 1]: tokens, loss
weights (1 on tokens whose prediction is trained), segment ids (1, 2, ... per
example, 0 for padding) and positions (restarting at 0 per example). The
model masks attention by segment id, so packed examples never see each other.

Held out: ``data.val_fraction`` of the examples (at least one), packed the
same way; the first ``data.val_sequences`` rows are the validation set.
Single-process only.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from elmjax.chat_template import ROLES, ChatTemplate
from elmjax.config import DataConfig
from elmjax.errors import UserError
from elmjax.sft_config import SFTConfig
from elmjax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class SFTDataError(UserError):
    """Chat data that cannot be used; the message names files, lines and reasons."""


def _messages(obj, where: str) -> list[dict]:
    """The example's messages, or SFTDataError naming ``where`` and the reason."""
    if not isinstance(obj, dict):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        if set(obj) - {"messages"}:
            raise SFTDataError(f"{where}: unexpected keys {sorted(set(obj) - {'messages'})} next to 'messages'")
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise SFTDataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise SFTDataError(f"{where}: messages[{i}] must be an object with exactly 'role' and 'content'")
            if m["role"] not in ROLES:
                raise SFTDataError(f"{where}: messages[{i}].role {m['role']!r} is not one of {list(ROLES)}")
            if not isinstance(m["content"], str):
                raise SFTDataError(f"{where}: messages[{i}].content must be a string")
            if m["role"] == "assistant" and not m["content"]:
                raise SFTDataError(f"{where}: messages[{i}] is an assistant message with empty content")
        if not any(m["role"] == "assistant" for m in msgs):
            raise SFTDataError(f"{where}: no assistant message (nothing to train on)")
        return msgs
    if set(obj) != {"prompt", "completion"}:
        raise SFTDataError(f"{where}: expected 'messages' or exactly 'prompt' and 'completion', got keys {sorted(obj)}")
    if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str) or not obj["completion"]:
        raise SFTDataError(f"{where}: 'prompt' must be a string and 'completion' a non-empty string")
    return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]


def read_examples(paths, max_invalid: int = 0) -> tuple[list[list[dict]], list[str]]:
    """(conversations, problems): every valid line of the files in order, and
    one 'file:line: reason' per malformed line."""
    examples, problems = [], []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise SFTDataError(f"sft.paths: {path}: no such file")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                examples.append(_messages(json.loads(line), where))
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON ({e.msg})")
            except SFTDataError as e:
                problems.append(str(e))
    if len(problems) > max_invalid:
        shown = "\n".join(problems[:20]) + (f"\n... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise SFTDataError(f"{len(problems)} malformed example(s) (sft.max_invalid={max_invalid}):\n{shown}")
    for p in problems:
        log.warning("dropped: %s", p)
    if not examples:
        raise SFTDataError(f"sft.paths: no valid examples in {list(paths)}")
    return examples, problems


def encode_example(messages, template: ChatTemplate, tokenizer, cfg: SFTConfig) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, weights): the example's token ids and 1 on the tokens trained on."""
    ids, weights = [], []
    for span in template.spans(messages, cfg.train_on_prompt):
        t = tokenizer.encode(span.text)
        ids += t
        weights += [int(span.trained)] * len(t)
    if cfg.add_eos:
        ids.append(tokenizer.eos_id)
        weights.append(int(messages[-1]["role"] == "assistant" or cfg.train_on_prompt))
    return np.asarray(ids, np.int32), np.asarray(weights, np.int32)


def _fit(tokens, weights, width: int, policy: str):
    if len(tokens) <= width:
        return tokens, weights
    if policy == "drop":
        return None
    if policy == "left":
        return tokens[-width:], weights[-width:]
    return tokens[:width], weights[:width]


def pack(examples: list[tuple[np.ndarray, np.ndarray]], width: int) -> np.ndarray:
    """Greedy packing in order into int32 rows [N, 4, width]."""
    rows, cur = [], []
    for ex in examples:
        if sum(len(t) for t, _ in cur) + len(ex[0]) > width:
            rows.append(cur)
            cur = []
        cur.append(ex)
    if cur:
        rows.append(cur)
    out = np.zeros((len(rows), 4, width), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for seg, (t, w) in enumerate(row, 1):
            n = len(t)
            out[r, 0, at:at + n] = t
            out[r, 1, at:at + n] = w
            out[r, 1, at] = 0  # never trained: its prediction would come from the previous example
            out[r, 2, at:at + n] = seg
            out[r, 3, at:at + n] = np.arange(n)
            at += n
    return out


@dataclass
class _Validation:
    tokens: np.ndarray  # int32 [N, 4, seq_len + 1]
    bytes_per_token: float


@dataclass
class SFTData:
    train_rows: np.ndarray
    validation: _Validation
    vocab_size: int
    stats: dict = field(default_factory=dict)  # examples, malformed, too_long (dropped or cut), rows

    def train_iterator(self, batch_size: int, seed: int) -> "RowIterator":
        return RowIterator(self.train_rows, batch_size, seed)


class RowIterator:
    """Endless batches of rows, reshuffled each epoch; exact ``get_state``/``set_state``."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows)))
        return self._cached[1]

    def __next__(self) -> np.ndarray:
        picked = []
        while len(picked) < self.batch_size:
            order = self._order()
            picked.append(self.rows[order[self.index]])
            self.index += 1
            if self.index == len(self.rows):
                self.epoch, self.index = self.epoch + 1, 0
        return np.stack(picked)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def load_sft(cfg: SFTConfig, data: DataConfig) -> SFTData:
    """Read, validate, encode, split and pack the chat files of ``cfg``."""
    tokenizer = load_tokenizer(data.tokenizer)
    template = ChatTemplate(cfg.template)
    conversations, problems = read_examples(cfg.paths, cfg.max_invalid)
    width = data.seq_len + 1
    encoded, too_long = [], 0
    for conv in conversations:
        t, w = encode_example(conv, template, tokenizer, cfg)
        too_long += len(t) > width
        fitted = _fit(t, w, width, cfg.truncation)
        if fitted is not None and fitted[1][1:].any():
            encoded.append(fitted)
    if too_long:
        log.warning("%d example(s) longer than %d tokens were %s (sft.truncation=%s)", too_long, width,
                    "dropped" if cfg.truncation == "drop" else "cut", cfg.truncation)
    if len(encoded) < 2:
        raise SFTDataError(f"sft.paths: {len(encoded)} usable example(s) of {len(conversations)}; need at least 2 "
                           f"(one held out); {too_long} exceed data.seq_len + 1 = {width} tokens and an example "
                           "whose assistant tokens are all cut away is unusable")
    order = np.random.default_rng(data.seed).permutation(len(encoded))
    n_val = min(len(encoded) - 1, max(1, math.ceil(data.val_fraction * len(encoded))))
    val_rows = pack([encoded[i] for i in order[:n_val]], width)[: data.val_sequences]
    train_rows = pack([encoded[i] for i in order[n_val:]], width)
    weighted = val_rows[:, 0, 1:][val_rows[:, 1, 1:] > 0]
    n_bytes = sum(len(tokenizer.decode([int(t)]).encode("utf-8")) for t in weighted)
    stats = {"examples": len(conversations), "malformed": len(problems), "too_long": too_long,
             "used": len(encoded), "train_rows": len(train_rows), "val_rows": len(val_rows)}
    log.info("chat data: %s", stats)
    return SFTData(train_rows, _Validation(val_rows, max(n_bytes, 1) / max(len(weighted), 1)),
                   tokenizer.vocab_size, stats)
