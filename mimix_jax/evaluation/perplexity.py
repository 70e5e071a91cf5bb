"""Perplexity of raw documents, each `<|begin_of_text|> text <|end_of_text|>`: every token after bos is a target,
eos included, and no target crosses a document boundary.

A document longer than the window is scored with a sliding window: windows of `window` targets start every
`stride` tokens and each scores only the targets no earlier window scored, so every target is predicted exactly
once with at least window - stride tokens of context, whatever the batch size or how the text was cut into files.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mimix_jax.data import batch as batch_lib, readers, schemas
from mimix_jax.model import sharding, transformer
from mimix_jax.model.config import ModelConfig
from mimix_jax.model.logprobs import token_nll


def windows(doc: np.ndarray, window: int, stride: int) -> Iterator[tuple[np.ndarray, int]]:
  """(tokens [<= window + 1], n_scored) per window: the last n_scored targets of each window are new."""
  n_targets = len(doc) - 1
  scored = 0
  start = 0
  while scored < n_targets:
    end = min(start + window, n_targets)  # this window's targets are doc[start + 1 : end + 1]
    yield doc[start:end + 1], end - scored
    scored = end
    start += stride
    if end == n_targets:
      break
    start = min(start, scored)  # never leave a gap between windows (stride > window)


def batches(docs: Iterable[np.ndarray], window: int, stride: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """The batch schema [batch_size, window] of windows, right-padded; the last batch padded with empty rows."""
  rows = []
  for doc in docs:
    for tokens, n_scored in windows(doc, window, stride):
      rows.append((tokens, n_scored))
      if len(rows) == batch_size:
        yield _pack(rows, window, batch_size)
        rows = []
  if rows:
    yield _pack(rows, window, batch_size)


def _pack(rows, window: int, batch_size: int) -> dict[str, np.ndarray]:
  """Stored rows [batch_size, window + 1]: the window's tokens as segment 1, its new targets in the loss mask."""
  tokens = np.zeros((batch_size, window + 1), np.int32)
  segment_ids = np.zeros((batch_size, window + 1), np.int32)
  loss_mask = np.zeros((batch_size, window + 1), np.int32)
  for i, (row, n_scored) in enumerate(rows):
    n = len(row)
    tokens[i, :n], segment_ids[i, :n] = row, 1
    loss_mask[i, n - n_scored:n] = 1
  return batch_lib.from_sequences(tokens, segment_ids, loss_mask)


def make_nll_fn(cfg: ModelConfig, mesh):
  """jit(params, batch) -> (sum of masked target NLL in float32, number of targets), replicated."""
  def fn(params, batch):
    h, _ = transformer.from_params(cfg, params).hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    nll, _ = token_nll(h, transformer.output_head(cfg, params), batch["targets"], cfg.vocab_size)
    return jnp.sum(nll * batch["loss_mask"]), jnp.sum(batch["loss_mask"])
  return jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def perplexity(nll_fn, params, mesh, docs: Iterable[np.ndarray], window: int, stride: int, batch_size: int,
               progress: tqdm | None = None) -> dict[str, float]:
  """Token-weighted NLL over docs; sums are accumulated in float64 on the host."""
  batch_sh = sharding.batch_sharding(mesh, 2)
  total, count = 0.0, 0
  for batch in batches(docs, window, stride, batch_size):
    device_batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    t, c = nll_fn(params, device_batch)
    total, count = total + float(t), count + int(c)
    if progress is not None:
      progress.update(int(c))
  loss = total / max(count, 1)
  return {"loss": loss, "ppl": math.exp(loss) if count else float("nan"), "tokens": count}


def documents(path: Path, tokenizer, text_fields: Sequence[str]) -> Iterator[np.ndarray]:
  """Token arrays [bos, ..., eos] of each document in one raw file (bad records are reported and skipped)."""
  parts: list[str] = []
  for item in readers.iter_items(path):
    text, problems = schemas.item_text(item, text_fields)
    for loc, reason, detail in problems:
      print(f"{loc}: skipped ({reason}: {detail})", file=sys.stderr)
    if text is None:
      continue
    if item.kind == "text":  # a .txt document may come in parts
      parts.append(text)
      if not item.last:
        continue
      text, parts = "".join(parts), []
    if text:
      yield np.asarray(tokenizer.encode(text, bos=True, eos=True), np.int32)
