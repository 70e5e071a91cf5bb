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
projects every position. Packed rows are spread over the batches so that their scored counts are even (N pads
little). On a CPU a forward runs in cache-sized steps: a few rows through the layers at a time, a block of
positions through the output projection at a time (logprobs.target_logprobs); 1.2x and 3x faster than whole
batches at the tiny preset. Packed rows are sharded over the mesh's data and fsdp axes and the params as
training shards them.

This is the only module of mimix_jax.evaluation that imports the model; loading a run's checkpoint is the
command's business (training/checkpoints), so the training loop can score its live params with it too.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import heapq
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mimix_jax.model import attention, sharding, transformer
from mimix_jax.model.logprobs import target_logprobs

MIN_LENGTH = 16
SCORED_MULTIPLE = 128  # scored positions per batch are padded to a multiple of this
CPU_BLOCK_BYTES = 2 << 20  # a float32 block this big (a step's FFN activations, a block of logits) stays in cache


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
  scored positions). On a CPU, forwards run in cache-sized steps (see the module docstring).
  """

  def __init__(self, model_cfg, params: dict, mesh: jax.sharding.Mesh, batch_tokens: int = 8192,
               max_logits: int = 1 << 26):
    self.cfg, self.params, self.mesh = model_cfg, params, mesh
    self.batch_tokens, self.max_logits = batch_tokens, max_logits
    self.shards = mesh.shape["data"] * mesh.shape["fsdp"]  # rows per batch must divide evenly over these
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    self.steps = _Steps(model_cfg, self.shards, _cpu_logit_rows(model_cfg.padded_vocab_size) if on_cpu else 0, on_cpu)
    # A step of a few rows is cheaper in one attention block: query blocks doubled the compile and saved nothing.
    forward_cfg = dataclasses.replace(model_cfg, attention_q_block=0) if on_cpu else model_cfg
    self._forward = jax.jit(functools.partial(_forward, forward_cfg, self.steps),
                            out_shardings=NamedSharding(mesh, P()))

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
    per_step = min(max(self.steps.rows(t), 1), max(1, self.batch_tokens // t // self.shards))
    unit = self.shards * per_step  # rows per batch: a whole number of steps on every shard, within batch_tokens
    most = max(unit, self.batch_tokens // t // unit * unit)
    while True:  # fewer rows per batch until their scored positions' logits fit in max_logits
      b = _least_padding(len(packed), unit, most)
      groups = _spread(packed, rows, _ceil_div(len(packed), b), b)
      quantum = math.lcm(SCORED_MULTIPLE, self.shards)
      n = _ceil_div(max(sum(p.scored(rows) for p in group) for group in groups), quantum) * quantum
      if b == unit or n * self.cfg.padded_vocab_size <= self.max_logits:
        break
      most = max(unit, b // 2 // unit * unit)
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


def _least_padding(n_rows: int, unit: int, most: int) -> int:
  """Rows per batch, a multiple of unit from most / 2 to most, that pads n_rows the least (the larger on a tie)."""
  sizes = range(max(unit, most // 2 // unit * unit), most + 1, unit)
  return min(sizes, key=lambda b: (_ceil_div(n_rows, b) * b, -b))


def _spread(packed: list[_Packed], rows, n_groups: int, capacity: int) -> list[list[_Packed]]:
  """The packed rows in n_groups batches of at most `capacity` rows with scored counts as even as may be: each,
  most scored first, into the least scored batch with room (longest processing time first)."""
  groups: list[list[_Packed]] = [[] for _ in range(n_groups)]
  open_groups = [(0, g) for g in range(n_groups)]  # (scored so far, group), a heap of those with room
  for row in sorted(packed, key=lambda p: -p.scored(rows)):
    scored, g = heapq.heappop(open_groups)
    groups[g].append(row)
    if len(groups[g]) < capacity:
      heapq.heappush(open_groups, (scored + row.scored(rows), g))
  return groups


def _pow2_at_most(n: int) -> int:
  return 1 << max(n, 1).bit_length() - 1


def _cpu_logit_rows(padded_vocab: int) -> int:
  """Positions per [rows, V] float32 logits block of CPU_BLOCK_BYTES: a power of two from 8 to SCORED_MULTIPLE,
  so it divides N."""
  return min(max(_pow2_at_most(CPU_BLOCK_BYTES // (4 * padded_vocab)), 8), SCORED_MULTIPLE)


@dataclasses.dataclass(frozen=True)
class _Steps:
  """How a forward is cut into steps: `rows(T)` packed rows per shard go through the layers at a time (0: the
  whole batch), `logit_rows` scored positions through the output projection (0: all N)."""

  cfg: object
  shards: int
  logit_rows: int
  on_cpu: bool

  def rows(self, t: int) -> int:
    """On a CPU, as many rows as keep a step's [rows T, F] FFN activations within CPU_BLOCK_BYTES (at least one)."""
    return _pow2_at_most(CPU_BLOCK_BYTES // (4 * t * self.cfg.d_ff)) if self.on_cpu else 0

  def run(self, trunk, arrays: tuple[jax.Array, ...]) -> jax.Array:
    """trunk(arrays [b', T]) -> [b', T, d] over the batch arrays [b, T], `rows(T)` per shard at a time. A step
    takes the same rows of every shard's block, so the reshapes move nothing between devices."""
    b, t = arrays[0].shape
    per_step, local = self.rows(t), b // self.shards
    if not 0 < per_step < local:
      return trunk(arrays)
    n = local // per_step
    to_steps = lambda x: x.reshape(self.shards, n, per_step, t).swapaxes(0, 1).reshape(n, self.shards * per_step, t)
    h = jax.lax.map(trunk, tuple(to_steps(x) for x in arrays))  # [n, shards per_step, T, d]
    return h.reshape(n, self.shards, per_step, t, -1).swapaxes(0, 1).reshape(b, t, -1)


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


def _forward(cfg, steps: _Steps, params, tokens, positions, doc, branch, gather, targets):
  """-> (log p(target) float32 [N], target is the argmax bool [N]) at the gathered slots."""
  def trunk(arrays):
    tokens, positions, doc, branch = arrays
    return transformer.forward(cfg, params, tokens, positions, doc, mask=attention.tree_mask(doc, branch))[0]

  h = steps.run(trunk, (tokens, positions, doc, branch))
  return target_logprobs(h.reshape(-1, h.shape[-1])[gather], transformer.output_head(cfg, params), targets,
                         cfg.vocab_size, steps.logit_rows)
