"""The preprocessing stages, as a table: what each stores (its shard Layout), the record columns it reads, how a
worker turns a task of raw items into tokens, and how the main process packs those into shards.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from mimix_jax.data import readers, schemas, shards
from mimix_jax.data.packing import DocumentPacker, SequencePacker, write_pair
from mimix_jax.data.readers import RecordError
from mimix_jax.text.tokenizer import Tokenizer

if TYPE_CHECKING:
  from mimix_jax.data.preprocess import Options

NO_TARGET = "no_target_within_max_len"
COMPLETION_TRUNCATED = "completion_truncated"


@dataclasses.dataclass
class TaskResult:
  """What a worker returns for one task, in input order.

  pretrain: `tokens` is every document part back to back (bos/eos inserted), `lengths` per part, `first`/`last`
  whether the part starts/ends its document. sft: `sequences` of (tokens, loss_mask). dpo: `pairs`.
  """

  records: int = 0
  written: int = 0
  tokens_total: int = 0
  bad: list[schemas.Problem] = dataclasses.field(default_factory=list)
  truncated: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  tokens: np.ndarray | None = None
  lengths: np.ndarray | None = None
  first: np.ndarray | None = None
  last: np.ndarray | None = None
  sequences: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
  pairs: list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = dataclasses.field(default_factory=list)

  def extend(self, other: "TaskResult") -> None:
    """Appends the results of the items after this result's (the same stage)."""
    self.records += other.records
    self.written += other.written
    self.tokens_total += other.tokens_total
    self.bad += other.bad
    self.truncated.update(other.truncated)
    self.sequences += other.sequences
    self.pairs += other.pairs
    if other.tokens is not None:
      for name in ("tokens", "lengths", "first", "last"):
        mine = getattr(self, name)
        setattr(self, name, getattr(other, name) if mine is None else np.concatenate([mine, getattr(other, name)]))


def _encode_pretrain(items: list[readers.Item], o: Options, tok: Tokenizer, res: TaskResult) -> None:
  texts, first, last = [], [], []
  for item in items:
    text, problems = schemas.item_text(item, o.text_fields)
    res.bad.extend(problems)
    if text is not None:
      texts.append(text)
      first.append(item.first)
      last.append(item.last)
  ids, lengths = tok.encode_many(texts)
  first, last = np.asarray(first, bool), np.asarray(last, bool)
  # bos before each document's first part, eos after its last; eos of one part precedes bos of the next.
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  where = np.concatenate([offsets[1:][last], offsets[:-1][first]])
  values = np.concatenate([np.full(last.sum(), tok.eos_id), np.full(first.sum(), tok.bos_id)]).astype(np.int32)
  order = np.argsort(where, kind="stable")
  res.tokens = np.insert(ids, where[order], values[order])
  res.lengths = lengths + first + last
  res.first, res.last = first, last
  res.written = int(last.sum())
  res.tokens_total = len(res.tokens)


def _records(items: list[readers.Item], res: TaskResult, of: Callable[[Any], Any], what: str) -> list[tuple[str, Any]]:
  """(loc, of(record)) for the items that parse; the rest are counted as bad."""
  out = []
  for item in items:
    try:
      if item.kind == "error":
        raise RecordError(*item.payload)
      if item.kind == "text":
        raise RecordError(readers.WRONG_TYPE, f".txt files hold no {what}")
      out.append((item.loc, of(readers.parse(item))))
    except RecordError as e:
      res.bad.append((item.loc, e.reason, e.detail))
  return out


def _encode_sft(items: list[readers.Item], o: Options, tok: Tokenizer, res: TaskResult) -> None:
  records = _records(items, res, lambda r: schemas.conversation_of(r, o.conversation_fields, o.system_message),
                     "conversations")
  row_len = o.max_len + 1
  for (loc, _), (tokens, mask, ends) in zip(records, tok.encode_dialogs([d for _, d in records])):
    try:
      tokens, mask, how = truncate_conversation(tokens, mask, ends, row_len)
    except RecordError as e:
      res.bad.append((loc, e.reason, e.detail))
      continue
    if how:
      res.truncated[how] += 1
    res.sequences.append((tokens, mask))
    res.tokens_total += len(tokens)
  res.written = len(res.sequences)


def truncate_conversation(tokens: np.ndarray, mask: np.ndarray, ends: np.ndarray, row_len: int):
  """(tokens, mask, how) cut to at most row_len tokens; how is None, "at_turn" or "mid_turn".

  Prefers the end of the last assistant turn that fits; else cuts inside the first assistant turn if some of
  it fits; else raises RecordError (nothing left to train on).
  """
  if len(tokens) <= row_len:
    return tokens, mask, None
  fitting = [e for e in ends if e <= row_len and mask[e - 1]]  # ends of assistant turns (their eot is a target)
  if fitting:
    cut, how = int(fitting[-1]), "at_turn"
  elif mask[:row_len].any():
    cut, how = row_len, "mid_turn"
  else:
    raise RecordError(NO_TARGET, f"{len(tokens)} tokens and no assistant token within the first {row_len}")
  return tokens[:cut], mask[:cut], how


def _encode_dpo(items: list[readers.Item], o: Options, tok: Tokenizer, res: TaskResult) -> None:
  records = _records(items, res, schemas.preference_of, "preference pairs")
  dialogs, loss_on = [], []
  for _, (cp, cc, rp, rc) in records:
    dialogs += [cp + cc, rp + rc]
    loss_on += [[False] * len(cp) + [True] * len(cc), [False] * len(rp) + [True] * len(rc)]
  row_len = o.max_len + 1
  encoded = tok.encode_dialogs(dialogs, loss_on=loss_on)
  for k, (loc, _) in enumerate(records):
    pair = [(t[:row_len], m[:row_len]) for t, m, _ in encoded[2 * k : 2 * k + 2]]
    if not all(m.any() for _, m in pair):
      res.bad.append((loc, COMPLETION_TRUNCATED, f"a completion starts after token {row_len} (max_len + 1)"))
      continue
    if any(len(t) > row_len for t, _, _ in encoded[2 * k : 2 * k + 2]):
      res.truncated["completion_cut"] += 1
    res.pairs.append((pair[0], pair[1]))
    res.tokens_total += len(pair[0][0]) + len(pair[1][0])
  res.written = len(res.pairs)


class _PretrainPacker(DocumentPacker):
  def add_result(self, res: TaskResult) -> None:
    if res.tokens is None:
      return
    bounds = np.concatenate([[0], np.cumsum(res.lengths)])
    for j in range(len(res.lengths)):
      self.add(res.tokens[bounds[j] : bounds[j + 1]], not res.first[j], bool(res.last[j]))


class _SftPacker(SequencePacker):
  def add_result(self, res: TaskResult) -> None:
    for tokens, mask in res.sequences:
      self.add(tokens, mask)


class _PairWriter:
  def __init__(self, writer: shards.ShardWriter):
    self.writer = writer

  def add_result(self, res: TaskResult) -> None:
    for chosen, rejected in res.pairs:
      write_pair(self.writer, chosen, rejected)

  def finish(self) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class Stage:
  layout: shards.Layout
  columns: Callable[[Options], tuple[str, ...]]  # the parquet columns worth reading
  encode: Callable[[list[readers.Item], Options, Tokenizer, TaskResult], None]
  packer: Callable[[shards.ShardWriter, Options, Tokenizer], Any]  # .add_result(res), .finish()
  packs: Callable[[Options], bool]  # several records per stored sequence


STAGES = {
    "pretrain": Stage(shards.LAYOUTS["pretrain"], lambda o: o.text_fields, _encode_pretrain,
                      lambda w, o, tok: _PretrainPacker(o.max_len + 1, w, tok.pad_id), lambda o: True),
    "sft": Stage(shards.LAYOUTS["sft"], lambda o: o.conversation_fields + ("system_prompt", "question", "response"),
                 _encode_sft, lambda w, o, tok: _SftPacker(o.max_len + 1, w, o.pack), lambda o: o.pack),
    "dpo": Stage(shards.LAYOUTS["dpo"], lambda o: ("prompt", "chosen", "rejected", "reject"), _encode_dpo,
                 lambda w, o, tok: _PairWriter(w), lambda o: False),
}
