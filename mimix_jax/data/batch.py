"""The batch schema: what a stored sequence becomes when the model trains on it or scores it.

A stored sequence of R = max_len + 1 tokens (with its segment ids and, for chat data, loss mask) becomes model
inputs of length T = R - 1. `FIELDS` are the arrays every loss reads (shaped [b, T], or [b, 2, T] for preference
pairs); the loader adds `index` (the record's global index, -1 for padding: host side only) and the preference
objective `reference_logps` ([b, 2] float32, see training/dpo_reference.py).
"""

from __future__ import annotations

import numpy as np

FIELDS = {
    "inputs": np.int32,  # tokens[:-1]
    "targets": np.int32,  # tokens[1:]
    "loss_mask": np.float32,  # 1 where the target is trained on / scored
    "segment_ids": np.int32,  # the inputs' document ids, 0 = padding
    "positions": np.int32,  # RoPE positions, from 0 at each document start
}
REFERENCE_LOGPS = "reference_logps"


def from_sequences(tokens: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray) -> dict[str, np.ndarray]:
  """Stored sequences [..., R] -> FIELDS [..., R - 1].

  inputs = tokens[:-1], targets = tokens[1:]; loss_mask = 1 where the target is a training target (stored loss
  mask) in the same segment as its input (so never the first token of the next document, never padding);
  segment_ids are the inputs'; positions count from 0 at each segment start.
  """
  inputs, targets = tokens[..., :-1], tokens[..., 1:]
  seg_in, seg_tgt = segment_ids[..., :-1], segment_ids[..., 1:]
  mask = (loss_mask[..., 1:] != 0) & (seg_tgt == seg_in) & (seg_tgt != 0)
  t = np.arange(inputs.shape[-1])
  starts = np.ones(seg_in.shape, bool)
  starts[..., 1:] = seg_in[..., 1:] != seg_in[..., :-1]
  positions = t - np.maximum.accumulate(np.where(starts, t, 0), axis=-1)
  out = {"inputs": inputs, "targets": targets, "loss_mask": mask, "segment_ids": seg_in, "positions": positions}
  return {k: v.astype(FIELDS[k]) for k, v in out.items()}
