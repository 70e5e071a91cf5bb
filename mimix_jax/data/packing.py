"""Turning tokenized documents and conversations into the sequences the shards store.

R = max_len + 1 is the stored sequence length (the loader shifts it into inputs and targets of length max_len).

pretrain: documents (bos ... eos) are packed back to back into rows of R tokens, each document a new
segment. A document that does not fit continues in the next row, whose first token repeats the previous row's
last token, so every token of the document is predicted exactly once (the reference's 1-token overlap) and
the next row restarts positions at 0. A document never starts in a row's last slot (that slot is only ever a
target, and a bos is never one), which is padded instead; so a row starts with bos iff it starts a document.
Nothing is dropped: only the very last row is shorter than R.

sft: one conversation per sequence, or with packing several whole conversations per sequence (greedy, in
order), each a new segment. dpo: the chosen and the rejected sequence of a pair, each its own segment 1.
"""

from __future__ import annotations

import numpy as np

from mimix_jax.data.shards import ShardWriter


class DocumentPacker:
  """Packs pretrain documents into rows of R tokens; see the module docstring for the rules."""

  def __init__(self, row_len: int, writer: ShardWriter, pad_id: int, block_rows: int = 1024):
    self.row_len = row_len
    self.writer = writer
    self.pad_id = pad_id
    self._tok = np.empty((block_rows, row_len), np.int32)
    self._seg = np.empty((block_rows, row_len), np.uint16)
    self._row = 0  # row being filled, within the block
    self._fill = 0  # tokens in that row
    self._nseg = 0  # segments in that row

  def add(self, tokens: np.ndarray, continues_doc: bool, ends_doc: bool) -> None:
    """Appends one document, or one part of it (`continues_doc`: the previous part's document goes on)."""
    if not continues_doc:
      if self._fill == self.row_len - 1:
        self._tok[self._row, -1] = self.pad_id
        self._seg[self._row, -1] = 0
        self._next_row()
      self._nseg += 1
    i, n = 0, len(tokens)
    while i < n:
      take = min(self.row_len - self._fill, n - i)
      self._tok[self._row, self._fill : self._fill + take] = tokens[i : i + take]
      self._seg[self._row, self._fill : self._fill + take] = self._nseg
      self._fill += take
      i += take
      if self._fill == self.row_len:
        last = self._tok[self._row, -1]
        self._next_row()
        if i < n or not ends_doc:  # the document goes on: its last token is the new row's first input
          self._tok[self._row, 0] = last
          self._seg[self._row, 0] = 1
          self._fill, self._nseg = 1, 1

  def _next_row(self) -> None:
    self._row += 1
    self._fill, self._nseg = 0, 0
    if self._row == len(self._tok):
      self._emit(self._row, self.row_len)
      self._row = 0

  def _emit(self, rows: int, last_len: int) -> None:
    """Writes the block's first `rows` rows; the last of them has `last_len` tokens."""
    lengths = np.full(rows, self.row_len, np.int64)
    lengths[-1] = last_len
    n = (rows - 1) * self.row_len + last_len  # rows are contiguous, so the stored tokens are a prefix
    self.writer.append(self._tok[:rows].reshape(-1)[:n].copy(), self._seg[:rows].reshape(-1)[:n].copy(), None, lengths)

  def finish(self) -> None:
    """Writes what is left, including the final partial row."""
    if self._fill:
      self._emit(self._row + 1, self._fill)
    elif self._row:
      self._emit(self._row, self.row_len)
    self._row, self._fill, self._nseg = 0, 0, 0


class SequencePacker:
  """SFT conversations: one per sequence, or (`pack`) several whole ones per sequence of at most R tokens."""

  def __init__(self, row_len: int, writer: ShardWriter, pack: bool):
    self.row_len = row_len
    self.writer = writer
    self.pack = pack
    self._parts: list[tuple[np.ndarray, np.ndarray]] = []
    self._fill = 0

  def add(self, tokens: np.ndarray, loss_mask: np.ndarray) -> None:
    if not self.pack or self._fill + len(tokens) > self.row_len:
      self.finish()
    self._parts.append((tokens, loss_mask))
    self._fill += len(tokens)

  def finish(self) -> None:
    if not self._parts:
      return
    seg = np.concatenate([np.full(len(t), i + 1, np.uint16) for i, (t, _) in enumerate(self._parts)])
    tokens = np.concatenate([t for t, _ in self._parts])
    mask = np.concatenate([m for _, m in self._parts])
    self.writer.append(tokens, seg, mask, np.asarray([len(tokens)]))
    self._parts, self._fill = [], 0


def write_pair(writer: ShardWriter, chosen: tuple[np.ndarray, np.ndarray], rejected: tuple[np.ndarray, np.ndarray]) -> None:
  """One DPO record: (tokens, loss_mask) of the chosen then the rejected sequence."""
  (ct, cm), (rt, rm) = chosen, rejected
  tokens = np.concatenate([ct, rt])
  writer.append(tokens, np.ones(len(tokens), np.uint16), np.concatenate([cm, rm]), np.asarray([len(ct), len(rt)]))
