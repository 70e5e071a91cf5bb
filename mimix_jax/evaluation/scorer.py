"""The JAX scorer: summed float32 log-likelihoods and greedy flags of many token rows per jitted forward.

A row is (tokens [n + 1], k): the model reads tokens[:-1] and the last k of tokens[1:] are scored (encoding.py
makes them). Rows are sorted longest first (as lm-eval does: the ETA over- rather than underestimates and a
too-large batch fails at once) and bucketed by input length to the next power of two (at least MIN_BUCKET, at
most max_len), so a whole evaluation compiles once per bucket. Each batch packs as many rows as
`batch_tokens` allows (a multiple of the mesh's batch shards), right-padded; rows are sharded over the mesh's
data and fsdp axes and the params as training shards them.

Only the last C positions of each row (C: the bucket's longest continuation, to a power of two) go through the
[d, V] output projection: continuations are a few tokens at the end of rows of hundreds, so this skips most
of the logits work and memory while computing the same float32 log-softmax at the scored positions.

This is the only module of mimix_jax.evaluation that imports the model; loading a run's checkpoint is the
command's business (training/checkpoints), so the training loop can score its live params with it too.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mimix_jax.model import sharding, transformer

MIN_BUCKET = 16


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


class Scorer:
  """Scores token rows with the model `model_cfg` whose params (a pure dict) live on `mesh`.

  batch_tokens bounds rows x bucket length per forward; max_logits bounds rows x C x vocab (the float32 logits
  of the scored positions).
  """

  def __init__(self, model_cfg, params: dict, mesh: jax.sharding.Mesh, batch_tokens: int = 8192,
               max_logits: int = 1 << 26):
    self.cfg, self.params, self.mesh = model_cfg, params, mesh
    self.batch_tokens, self.max_logits = batch_tokens, max_logits
    self.shards = mesh.shape["data"] * mesh.shape["fsdp"]  # rows per batch must divide evenly over these
    self._forward = jax.jit(functools.partial(_forward, model_cfg), out_shardings=NamedSharding(mesh, P()))

  @property
  def max_len(self) -> int:
    return self.cfg.max_len

  def score(self, rows: Sequence[tuple[np.ndarray, int]], progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood float32 [N], greedy bool [N]) of the rows; progress: a tqdm to advance per row."""
    lls, greedy = np.zeros(len(rows), np.float32), np.zeros(len(rows), bool)
    pending: list[tuple[list[int], Any]] = []

    def collect(batch, out):
      ll, gr = jax.device_get(out)
      lls[batch], greedy[batch] = ll[:len(batch)], gr[:len(batch)]
      if progress is not None:
        progress.update(len(batch))

    with sharding.activate(self.mesh):
      for batch, arrays in self._batches(rows):
        pending.append((batch, self._forward(self.params, *arrays)))
        if len(pending) > 1:  # fetch the previous batch while this one runs
          collect(*pending.pop(0))
      for item in pending:
        collect(*item)
    return lls, greedy

  def _batches(self, rows):
    """(row indices, device arrays) per batch, longest bucket first."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    buckets: dict[int, list[int]] = {}
    for i in order:
      t = min(max(MIN_BUCKET, _pow2_at_least(len(rows[i][0]) - 1)), self.max_len)
      buckets.setdefault(t, []).append(i)
    for t, members in buckets.items():
      c = min(t, _pow2_at_least(max(rows[i][1] for i in members)))
      b = self._rows_per_batch(t, c, len(members))
      for start in range(0, len(members), b):
        batch = members[start:start + b]
        yield batch, [self._put(a) for a in _pack([rows[i] for i in batch], b, t, c)]

  def _rows_per_batch(self, t: int, c: int, n: int) -> int:
    b = min(self.batch_tokens // t, self.max_logits // (c * self.cfg.padded_vocab_size))
    b = min(b, -(-n // self.shards) * self.shards)  # no batch wider than the bucket needs
    return max(self.shards, b // self.shards * self.shards)

  def _put(self, array: np.ndarray) -> jax.Array:
    """A global host array onto the batch sharding; every process holds the same array, so this also works
    when the mesh spans processes."""
    sh = sharding.batch_sharding(self.mesh, array.ndim)
    return jax.make_array_from_callback(array.shape, sh, lambda index: array[index])


def _pack(rows, b: int, t: int, c: int) -> list[np.ndarray]:
  """inputs, segment_ids [b, t]; ends [b] (input tokens per row); targets, mask [b, c]: each row's last c
  targets, right-aligned, mask 1 on its scored continuation. Rows past len(rows) are empty padding."""
  inputs, segment_ids = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  ends = np.zeros(b, np.int32)
  targets, mask = np.zeros((b, c), np.int32), np.zeros((b, c), bool)
  for i, (tokens, k) in enumerate(rows):
    n = len(tokens) - 1
    inputs[i, :n], segment_ids[i, :n], ends[i] = tokens[:-1], 1, n
    last = tokens[1:][-c:]
    targets[i, c - len(last):] = last
    mask[i, c - k:] = True
  return [inputs, segment_ids, ends, targets, mask]


def _forward(cfg, params, inputs, segment_ids, ends, targets, mask):
  """-> (summed log-likelihood of the masked targets float32 [B], all of them the argmax bool [B])."""
  h, _ = transformer.from_params(cfg, params).hidden(inputs, None, segment_ids)  # [B, T, d]
  c = targets.shape[1]
  positions = jnp.clip(ends[:, None] - c + jnp.arange(c), 0, inputs.shape[1] - 1)  # [B, C]
  logits = transformer.logits(transformer.output_head(cfg, params), jnp.take_along_axis(h, positions[..., None], axis=1),
                              cfg.vocab_size)  # [B, C, V] float32
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
  ll = jnp.sum(jnp.where(mask, logp, 0.0), axis=-1)  # where, not *: padding rows may hold inf
  greedy = jnp.all(jnp.where(mask, jnp.argmax(logits, axis=-1) == targets, True), axis=-1)
  return ll, greedy
