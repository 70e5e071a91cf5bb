"""The JAX scorer: summed float32 log-likelihoods and greedy flags of many token rows per jitted forward.

A row is (tokens [n + 1], k): the model reads tokens[:-1] and the last k of tokens[1:] are scored (encoding.py
makes them). The n - k tokens before the first scored position are the row's prefix; the choices of a
multiple-choice doc share it (same context, and so the same tokens unless truncation cut them differently),
and so do few-shot examples' long contexts. Each distinct prefix is run once, into a KV cache, and each row's
continuation (its last k inputs) then runs on that cache: the choices of a doc cost one context, not four.

Prefixes are sorted longest first (as lm-eval sorts: the ETA over- rather than underestimates and a batch too
large fails at once) and bucketed by their length and their longest continuation, each to a power of two, so
a whole evaluation compiles a prefill and a continuation step per pair of buckets (about 12 pairs for these
tasks at 0 shots, 5 at 5 shots: few-shot prefixes are long, their continuations alike). A batch holds as many prefixes as `batch_tokens` allows (a multiple of the mesh's
batch shards), right-padded (segment 0, which attention ignores); the j-th continuations of a batch's prefixes
run together, rows with fewer choices padded. Rows are sharded over the mesh's data and fsdp axes, the params
as training shards them. Only continuation positions go through the [d, V] output projection.

This is the only module of mimix_jax.evaluation that imports the rest of mimix_jax.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mimix_jax import checkpoint as checkpoints
from mimix_jax import model as transformer
from mimix_jax import sharding
from mimix_jax.tokenizer import Tokenizer

MIN_BUCKET = 16
MIN_CONTINUATION = 8


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass
class _Job:
  """One distinct prefix and the rows that continue it."""
  prefix: np.ndarray  # int32 [p]
  rows: list[int]  # indices into the scored rows


class Scorer:
  """Scores token rows with the model `model_cfg` whose params (a pure dict) live on `mesh`.

  batch_tokens bounds prefixes x (prefix + continuation bucket) per batch; max_logits bounds rows x
  continuation bucket x vocab (the float32 logits of one continuation step).
  """

  def __init__(self, model_cfg, params: dict, mesh: jax.sharding.Mesh, batch_tokens: int = 4096,
               max_logits: int = 1 << 26):
    self.cfg, self.params, self.mesh = model_cfg, params, mesh
    self.batch_tokens, self.max_logits = batch_tokens, max_logits
    self.shards = mesh.shape["data"] * mesh.shape["fsdp"]  # rows per batch must divide evenly over these
    graphdef, _ = nnx.split(transformer.abstract(model_cfg), nnx.Param)
    replicated = NamedSharding(mesh, P())
    self._prefill = jax.jit(functools.partial(_prefill, graphdef), static_argnums=(3,))
    self._continue = jax.jit(functools.partial(_continue, graphdef), out_shardings=replicated)

  @property
  def max_len(self) -> int:
    return self.cfg.max_len

  @classmethod
  def from_checkpoint(cls, path, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None,
                      **kwargs) -> tuple[Scorer, Tokenizer]:
    """The scorer of a run directory (latest checkpoint) or step directory, and the run's tokenizer.

    mesh: default all devices on the fsdp axis; dtype: the compute dtype (default: the run's).
    """
    info = checkpoints.read_run_info(path)
    cfg = info.model if dtype is None else dataclasses.replace(info.model, dtype=dtype)
    mesh = mesh or sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    _, abstract = nnx.split(transformer.abstract(cfg), nnx.Param)
    params = checkpoints.load_params(path, cfg, sharding.param_shardings(abstract, mesh))
    return cls(cfg, params, mesh, **kwargs), Tokenizer.load(info.tokenizer_dir)

  def score(self, rows: Sequence[tuple[np.ndarray, int]], progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood float32 [N], greedy bool [N]) of the rows; progress: a tqdm to advance per row."""
    lls, greedy = np.zeros(len(rows), np.float32), np.zeros(len(rows), bool)
    pending: list[tuple[list[int], Any]] = []

    def collect(batch, out):
      ll, gr = jax.device_get(out)
      real = [i for i in batch if i >= 0]
      lls[real], greedy[real] = ll[np.asarray(batch) >= 0], gr[np.asarray(batch) >= 0]
      if progress is not None:
        progress.update(len(real))

    with sharding.activate(self.mesh):
      for batch, cache, arrays in self._batches(rows):
        pending.append((batch, self._continue(self.params, cache, *arrays)))
        if len(pending) > 1:  # fetch the previous step while this one runs
          collect(*pending.pop(0))
      for item in pending:
        collect(*item)
    return lls, greedy

  def _batches(self, rows):
    """(row indices with -1 for padding, the prefix cache, device arrays) per continuation step."""
    for (t, c), jobs in _bucketed_jobs(rows, self.max_len).items():
      b = self._jobs_per_batch(t + c, c, len(jobs))
      for start in range(0, len(jobs), b):
        batch = jobs[start:start + b]
        cache = self._prefill(self.params, *[self._put(a) for a in _pack_prefixes(batch, b, t)], t + c)
        for j in range(max(len(job.rows) for job in batch)):
          indices, arrays = _pack_continuations(rows, batch, j, b, c)
          yield indices, cache, [self._put(a) for a in arrays]

  def _jobs_per_batch(self, s: int, c: int, n: int) -> int:
    b = min(self.batch_tokens // s, self.max_logits // (c * self.cfg.padded_vocab_size))
    b = min(b, -(-n // self.shards) * self.shards)  # no batch wider than the bucket needs
    return max(self.shards, b // self.shards * self.shards)

  def _put(self, array: np.ndarray) -> jax.Array:
    """A global host array onto the batch sharding; every process holds the same array, so this also works
    when the mesh spans processes."""
    sh = sharding.batch_sharding(self.mesh, array.ndim)
    return jax.make_array_from_callback(array.shape, sh, lambda index: array[index])


def _bucketed_jobs(rows, max_len: int) -> dict[tuple[int, int], list[_Job]]:
  """{(prefix bucket T, continuation bucket C): jobs}, longest first. A job's buckets are its prefix length and
  its longest continuation, each to a power of two (C at least MIN_CONTINUATION: short continuations are cheap
  to pad, compiles are not); a bucket's jobs are sorted by their number of rows, so that batches need few
  padded continuation steps."""
  jobs: dict[bytes, _Job] = {}
  for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
    tokens, k = rows[i]
    prefix = tokens[:len(tokens) - 1 - k]
    jobs.setdefault(prefix.tobytes(), _Job(prefix, [])).rows.append(i)
  buckets: dict[tuple[int, int], list[_Job]] = {}
  for job in jobs.values():
    t = min(max(MIN_BUCKET, _pow2_at_least(len(job.prefix))), max_len)
    c = max(MIN_CONTINUATION, _pow2_at_least(max(rows[i][1] for i in job.rows)))
    buckets.setdefault((t, c), []).append(job)
  return {tc: sorted(jobs, key=lambda job: -len(job.rows)) for tc, jobs in sorted(buckets.items(), reverse=True)}


def _pack_prefixes(jobs: list[_Job], b: int, t: int) -> list[np.ndarray]:
  """tokens, segment_ids [b, t]: the prefixes, right-padded; rows past len(jobs) are empty."""
  tokens, segment_ids = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for r, job in enumerate(jobs):
    tokens[r, :len(job.prefix)], segment_ids[r, :len(job.prefix)] = job.prefix, 1
  return [tokens, segment_ids]


def _pack_continuations(rows, jobs: list[_Job], j: int, b: int, c: int) -> tuple[list[int], list[np.ndarray]]:
  """The j-th continuation of each job: row indices (-1: none) and inputs, positions, segment_ids, targets,
  mask [b, c], left-aligned after each prefix."""
  indices = [-1] * b
  inputs, positions = np.zeros((b, c), np.int32), np.zeros((b, c), np.int32)
  segment_ids, targets, mask = np.zeros((b, c), np.int32), np.zeros((b, c), np.int32), np.zeros((b, c), bool)
  for r, job in enumerate(jobs):
    if j >= len(job.rows):
      continue
    indices[r] = i = job.rows[j]
    tokens, k = rows[i]
    p = len(job.prefix)
    inputs[r, :k], targets[r, :k] = tokens[p:p + k], tokens[p + 1:]
    positions[r] = p + np.arange(c)
    segment_ids[r, :k], mask[r, :k] = 1, True
  return indices, [inputs, positions, segment_ids, targets, mask]


def _layers(model):
  """Per-layer weights for an unrolled model (scan_layers=False, faster on a CPU), else None (scan)."""
  return None if model.cfg.scan_layers else model.split_layers()


def _prefill(graphdef, params, tokens, segment_ids, slots: int):
  """The prefixes [B, T] into a fresh KV cache of `slots` slots (T + the continuation bucket)."""
  model = nnx.merge(graphdef, params)
  cache = model.init_cache(tokens.shape[0], slots, per_layer=not model.cfg.scan_layers)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  _, cache = model.hidden(tokens, positions, segment_ids, cache, _layers(model))
  return cache


def _continue(graphdef, params, cache, inputs, positions, segment_ids, targets, mask):
  """Continuations [B, C] on their prefixes' cache -> (summed log-likelihood of the masked targets float32
  [B], all of them the argmax bool [B])."""
  model = nnx.merge(graphdef, params)
  positions = jnp.minimum(positions, model.cfg.max_len - 1)  # padding past the last real position
  h, _ = model.hidden(inputs, positions, segment_ids, cache, _layers(model))
  logits = model.logits(h)  # [B, C, V] float32
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
  ll = jnp.sum(jnp.where(mask, logp, 0.0), axis=-1)  # where, not *: padding rows may hold inf
  greedy = jnp.all(jnp.where(mask, jnp.argmax(logits, axis=-1) == targets, True), axis=-1)
  return ll, greedy
