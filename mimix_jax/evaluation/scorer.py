"""The JAX scorer: summed float32 log-likelihoods and greedy flags of many token rows, packed into few forwards.

A row is (tokens [n + 1], k): the model reads tokens[:-1] and the last k of tokens[1:] are scored (encoding.py
makes them). Its *context* is tokens[:n - k + 1] (up to the input that predicts the first scored token) and its
*branch* the k - 1 inputs after it.

Rows that share a context (a document's choices, every row of a one-token-answer task with the same prompt) form
a tree: the context once, then each row's branch, which attends to the context and to itself only
(attention.tree_mask), with RoPE positions that continue the context in every branch. The model computes exactly
what a forward pass over each row alone computes, but every context's tokens run once. Trees are packed
best-fit into rows of one length T (the longest tree's power of two, at most max_len), so an evaluation compiles
one function and pads little: on the eight sample tasks this runs 60k tokens where one row per request padded to
powers of two ran 164k.

Only the scored positions (N per batch, the same for every batch) go through the [d, V] output projection: lm-eval
projects every position. Packed rows are sharded over the mesh's data and fsdp axes and the params as training
shards them.

This is the only module of mimix_jax.evaluation that imports the model; loading a run's checkpoint is the
command's business (training/checkpoints), so the training loop can score its live params with it too.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mimix_jax.model import attention, sharding, transformer

MIN_LENGTH = 16
SCORED_MULTIPLE = 128  # scored positions per batch are padded to a multiple of this


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass
class _Tree:
  """One context and the rows continuing it: len(tokens) = len(context) + their k - 1 each."""

  context: np.ndarray
  rows: list[int]

  def size(self, rows) -> int:
    return len(self.context) + sum(rows[i][1] - 1 for i in self.rows)


@dataclasses.dataclass
class _Packed:
  """One packed row: trees side by side, `length` tokens in all."""

  length: int = 0
  trees: list[_Tree] = dataclasses.field(default_factory=list)

  def scored(self, rows) -> int:
    return sum(rows[i][1] for tree in self.trees for i in tree.rows)


class Scorer:
  """Scores token rows with the model `model_cfg` whose params (a pure dict) live on `mesh`.

  batch_tokens bounds packed rows x T per forward; max_logits bounds N x vocab (the float32 logits of a batch's
  scored positions).
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
    lls, greedy = np.zeros(len(rows), np.float32), np.ones(len(rows), bool)
    pending = []

    def collect(owner, out):
      logp, hit = jax.device_get(out)
      scored = owner >= 0
      np.add.at(lls, owner[scored], logp[scored])  # in slot order, float32, as the row's own sum would go
      np.logical_and.at(greedy, owner[scored], hit[scored])
      if progress is not None:
        progress.update(len(np.unique(owner[scored])))

    with sharding.activate(self.mesh):
      for owner, arrays in self._batches(rows):
        pending.append((owner, self._forward(self.params, *(self._put(a) for a in arrays))))
        if len(pending) > 1:  # fetch the previous batch while this one runs
          collect(*pending.pop(0))
      for item in pending:
        collect(*item)
    return lls, greedy

  def _batches(self, rows):
    """(owner [N]: the row each scored position belongs to, -1 for none; the forward's arrays) per batch."""
    if not rows:
      return
    packed = _pack_trees(_trees(rows, self.max_len), rows, self.max_len)
    t = min(self.max_len, max(MIN_LENGTH, _pow2_at_least(max(p.length for p in packed))))
    b = max(self.shards, self.batch_tokens // t // self.shards * self.shards)
    while True:  # fewer rows per batch until their scored positions' logits fit in max_logits
      b = _ceil_div(_ceil_div(len(packed), _ceil_div(len(packed), b)), self.shards) * self.shards  # even batches
      groups = [packed[start:start + b] for start in range(0, len(packed), b)]
      quantum = math.lcm(SCORED_MULTIPLE, self.shards)
      n = _ceil_div(max(sum(p.scored(rows) for p in group) for group in groups), quantum) * quantum
      if b == self.shards or n * self.cfg.padded_vocab_size <= self.max_logits:
        break
      b = max(self.shards, b // 2)
    for group in groups:
      yield _arrays(group, rows, b, t, n)

  def _put(self, array: np.ndarray) -> jax.Array:
    """A global host array onto the batch sharding; every process holds the same array, so this also works
    when the mesh spans processes."""
    sh = sharding.batch_sharding(self.mesh, array.ndim)
    return jax.make_array_from_callback(array.shape, sh, lambda index: array[index])


def _trees(rows, max_len: int) -> list[_Tree]:
  """Rows grouped by context, in first-seen order; a tree that would outgrow max_len is split (each part
  repeats the context)."""
  by_context: dict[bytes, list[_Tree]] = {}
  for i, (tokens, k) in enumerate(rows):
    context = np.asarray(tokens[:len(tokens) - k], np.int32)
    trees = by_context.setdefault(context.tobytes(), [_Tree(context, [])])
    if trees[-1].rows and trees[-1].size(rows) + k - 1 > max_len:
      trees.append(_Tree(context, []))
    trees[-1].rows.append(i)
  return [tree for trees in by_context.values() for tree in trees]


def _pack_trees(trees: list[_Tree], rows, capacity: int) -> list[_Packed]:
  """Best-fit decreasing: each tree, largest first, into the fullest packed row it still fits in."""
  packed: list[_Packed] = []
  free: list[tuple[int, int]] = []  # (room left, packed index), sorted
  for tree in sorted(trees, key=lambda tr: -tr.size(rows)):
    size = tree.size(rows)
    at = bisect.bisect_left(free, (size, -1))
    if at == len(free):
      packed.append(_Packed())
      room, index = capacity, len(packed) - 1
    else:
      room, index = free.pop(at)
    packed[index].trees.append(tree)
    packed[index].length += size
    bisect.insort(free, (room - size, index))
  return packed


def _arrays(packed: list[_Packed], rows, b: int, t: int, n: int):
  """owner [N] and the forward's inputs: tokens, positions, doc, branch [b, T]; gather (flat slots r * T + slot),
  targets [N]. Rows past len(packed) are padding (doc 0), and so are scored positions past the last (owner -1)."""
  tokens, positions = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  doc, branch = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  gather, targets, owner = np.zeros(n, np.int32), np.zeros(n, np.int32), np.full(n, -1, np.int64)
  scored = 0
  for r, row in enumerate(packed):
    slot = 0
    for d, tree in enumerate(row.trees, start=1):
      m = len(tree.context)
      tokens[r, slot:slot + m], positions[r, slot:slot + m], doc[r, slot:slot + m] = tree.context, np.arange(m), d
      last_context, slot = r * t + slot + m - 1, slot + m
      for j, i in enumerate(tree.rows, start=1):
        row_tokens, k = rows[i]
        branch_inputs = row_tokens[len(row_tokens) - k:-1]  # k - 1 tokens
        tokens[r, slot:slot + k - 1], positions[r, slot:slot + k - 1] = branch_inputs, m + np.arange(k - 1)
        doc[r, slot:slot + k - 1], branch[r, slot:slot + k - 1] = d, j
        gather[scored:scored + k] = [last_context, *range(r * t + slot, r * t + slot + k - 1)]
        targets[scored:scored + k], owner[scored:scored + k] = row_tokens[len(row_tokens) - k:], i
        slot, scored = slot + k - 1, scored + k
  return owner, (tokens, positions, doc, branch, gather, targets)


def _forward(cfg, params, tokens, positions, doc, branch, gather, targets):
  """-> (log p(target) float32 [N], target is the argmax bool [N]) at the gathered slots."""
  h, _ = transformer.from_params(cfg, params).hidden(tokens, positions, doc, mask=attention.tree_mask(doc, branch))
  logits = transformer.logits(transformer.output_head(cfg, params), h.reshape(-1, h.shape[-1])[gather],
                              cfg.vocab_size)  # [N, V] float32
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[:, None], axis=-1)[:, 0]
  return logp, jnp.argmax(logits, axis=-1) == targets
