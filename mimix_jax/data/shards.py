"""The on-disk shard format: flat .npy token arrays with offsets, read by memory mapping.

A shard directory holds `manifest.json` and, per shard `shard-NNNNN`:
  shard-NNNNN.tokens.npy       uint16 (vocab <= 65536) or uint32 [n_tokens]   all sequences back to back
  shard-NNNNN.segment_ids.npy  uint16 [n_tokens]   1, 2, ... per document/conversation within a sequence
  shard-NNNNN.loss_mask.npy    uint8  [n_tokens]   sft/dpo only: 1 where the token is a training target
  shard-NNNNN.offsets.npy      int64  [n_sequences + 1]   sequence s is [offsets[s], offsets[s+1])
A record (what the loader indexes) is one sequence for pretrain/sft and two (chosen, rejected) for dpo.
Sequences hold at most max_len + 1 tokens and are stored unpadded; the loader pads them.

Why not ArrayRecord: records here are integer arrays, so .npy needs no serialization, is read zero-copy
through mmap, can be inspected with plain NumPy, and needs no extra wheel on machines that lack one (the GPU
image ships without array_record). Offsets make every record O(1) to find.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "mimix-npy-shards"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a preprocessing stage stores (the manifest's `stage` names it)."""

  sequences_per_record: int  # 2 for a preference pair: chosen, then rejected
  stores_loss_mask: bool  # pretrain trains on every token inside a document, so it stores no mask
  chat: bool  # conversations in the chat template: a model trained on them is a chat model


LAYOUTS = {
    "pretrain": Layout(sequences_per_record=1, stores_loss_mask=False, chat=False),
    "sft": Layout(sequences_per_record=1, stores_loss_mask=True, chat=True),
    "dpo": Layout(sequences_per_record=2, stores_loss_mask=True, chat=True),
}


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(i: int) -> str:
  return f"shard-{i:05d}"


class ShardWriter:
  """Buffers whole records and writes a shard whenever `shard_tokens` tokens have accumulated.

  append() takes flat arrays of complete records: tokens/segment_ids/loss_mask [sum(lengths)] and the
  sequence lengths (a multiple of the sequences per record). Memory is bounded by one shard.
  """

  def __init__(self, directory: Path, layout: Layout, vocab_size: int, shard_tokens: int):
    self.directory = Path(directory)
    self.per_record = layout.sequences_per_record
    self.with_mask = layout.stores_loss_mask
    self.dtype = token_dtype(vocab_size)
    self.shard_tokens = shard_tokens
    self.shards: list[dict[str, Any]] = []
    self._buf: dict[str, list[np.ndarray]] = {"tokens": [], "segment_ids": [], "loss_mask": [], "lengths": []}
    self._buffered = 0

  def append(self, tokens: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray | None, lengths: np.ndarray) -> None:
    if len(lengths) % self.per_record:
      raise ValueError(f"{len(lengths)} sequences do not make whole records of {self.per_record}")
    self._buf["tokens"].append(tokens.astype(self.dtype, copy=False))
    self._buf["segment_ids"].append(segment_ids.astype(np.uint16, copy=False))
    if self.with_mask:
      self._buf["loss_mask"].append(loss_mask.astype(np.uint8, copy=False))
    self._buf["lengths"].append(np.asarray(lengths, np.int64))
    self._buffered += len(tokens)
    if self._buffered >= self.shard_tokens:
      self.flush()

  def flush(self) -> None:
    if not self._buf["lengths"]:
      return
    name = shard_name(len(self.shards))
    lengths = np.concatenate(self._buf["lengths"])
    arrays = {
        "tokens": np.concatenate(self._buf["tokens"]),
        "segment_ids": np.concatenate(self._buf["segment_ids"]),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }
    if self.with_mask:
      arrays["loss_mask"] = np.concatenate(self._buf["loss_mask"])
    for key, arr in arrays.items():
      np.save(self.directory / f"{name}.{key}.npy", arr)
    self.shards.append({"name": name, "records": len(lengths) // self.per_record, "tokens_stored": int(len(arrays["tokens"]))})
    self._buf = {k: [] for k in self._buf}
    self._buffered = 0


def read_manifest(path: str | os.PathLike) -> dict:
  """The manifest of a shard directory (stage, max_len, counts, tokenizer hash, shards...)."""
  path = Path(path)
  file = path / "manifest.json" if path.is_dir() else path
  if not file.is_file():
    raise FileNotFoundError(f"{path}: no manifest.json (not a preprocessed shard directory, or preprocessing did not finish)")
  manifest = json.loads(file.read_text(encoding="utf-8"))
  if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{file}: not a {FORMAT} v{FORMAT_VERSION} manifest")
  return manifest


class ShardSource:
  """Grain random-access source over a shard directory: record i -> fixed-shape, padded arrays.

  Returns {"tokens" int32, "segment_ids" int32, "loss_mask" uint8} of shape [max_len + 1] (pretrain, sft) or
  [2, max_len + 1] (dpo), padding with pad_id / 0 / 0, plus "index" int64 (the record's global index).
  Memory maps are opened lazily in each process, so the source pickles cheaply into Grain workers.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.manifest = read_manifest(self.path)
    self.stage = self.manifest["stage"]
    self.layout = LAYOUTS[self.stage]
    self.row_len = self.manifest["max_len"] + 1
    self.pad_id = self.manifest["pad_id"]
    self.per_record = self.layout.sequences_per_record
    counts = [s["records"] for s in self.manifest["shards"]]
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self._arrays: list[dict[str, np.ndarray]] | None = None

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}

  def _shard(self, k: int) -> dict[str, np.ndarray]:
    if self._arrays is None:
      self._arrays = [None] * len(self.manifest["shards"])
    if self._arrays[k] is None:
      name = self.manifest["shards"][k]["name"]
      keys = ("tokens", "segment_ids", "offsets") + (("loss_mask",) if self.layout.stores_loss_mask else ())
      self._arrays[k] = {key: np.load(self.path / f"{name}.{key}.npy", mmap_mode="r") for key in keys}
    return self._arrays[k]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range for {self.path} ({len(self)} records)")
    k = int(np.searchsorted(self._starts, index, side="right")) - 1
    arrays = self._shard(k)
    local = (index - int(self._starts[k])) * self.per_record
    out = self._blank()
    for j in range(self.per_record):
      start, end = int(arrays["offsets"][local + j]), int(arrays["offsets"][local + j + 1])
      n = end - start
      out["tokens"][j, :n] = arrays["tokens"][start:end]
      seg = arrays["segment_ids"][start:end]
      out["segment_ids"][j, :n] = seg
      out["loss_mask"][j, :n] = arrays["loss_mask"][start:end] if "loss_mask" in arrays else seg != 0
    out["index"] = np.int64(index)
    return self._squeeze(out)

  def padding_record(self) -> dict[str, np.ndarray]:
    """A record of padding only (segment ids 0, loss mask 0), with index -1."""
    return self._squeeze(self._blank())

  def _blank(self) -> dict[str, np.ndarray]:
    shape = (self.per_record, self.row_len)
    return {
        "tokens": np.full(shape, self.pad_id, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "loss_mask": np.zeros(shape, np.uint8),
        "index": np.int64(-1),
    }

  def _squeeze(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if self.per_record > 1:
      return record
    return {k: v if k == "index" else v[0] for k, v in record.items()}
