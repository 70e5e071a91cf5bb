"""Next-token selection: repetition penalty, temperature, top-k / top-p / min-p filtering, seeded sampling.

Everything here is a pure function of [B, V] float32 logits that runs inside the jitted decode loop. The
numeric settings are traced scalars (changing them never recompiles); only "greedy or not" and "penalty or
not" are static, because they decide which work exists at all.

Rules: top-k keeps exactly k tokens, ties at the boundary broken towards the lower token id;
`max_repetition_penalty` clamps the penalty factor; the repetition penalty counts only the tokens generated in
this call, not the prompt, system message or earlier chat turns (penalising the prompt pushes the model away
from the very names and words the user asked about, and in a long chat the history would penalise nearly
everything). README's "differs from the original" says where the original does otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen. Neutral values switch a filter off."""

  temperature: float = 1.0  # 0 = greedy (argmax)
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  top_p: float = 1.0  # keep the smallest most-likely prefix whose probability reaches p; 1 = off
  min_p: float = 0.0  # keep tokens with probability >= min_p * the top probability; 0 = off
  repetition_penalty: float = 1.0  # > 1 discourages tokens already generated; 1 = off
  repetition_window: int = 0  # only the last N generated tokens count; 0 = all of them
  repetition_decay: float = 1.0  # an occurrence d tokens before the newest one weighs decay**d
  max_repetition_penalty: float = 0.0  # clamp the compounded factor to [1/max, max]; 0 = no clamp
  seed: int = 0

  def __post_init__(self):
    checks = [
        (self.temperature >= 0, "temperature must be >= 0"),
        (self.top_k >= 0, "top_k must be >= 0"),
        (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
        (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
        (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        (self.repetition_window >= 0, "repetition_window must be >= 0"),
        (self.repetition_decay > 0, "repetition_decay must be > 0"),
        (self.max_repetition_penalty == 0 or self.max_repetition_penalty >= 1,
         "max_repetition_penalty must be 0 (off) or >= 1"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def penalize(self) -> bool:
    return self.repetition_penalty != 1

  def arrays(self) -> dict[str, np.ndarray]:
    """The numeric settings as scalars for the traced (non-static) part of the decode state."""
    ints = ("top_k", "repetition_window")
    return {f.name: np.asarray(getattr(self, f.name), np.int32 if f.name in ints else np.float32)
            for f in dataclasses.fields(self) if f.name != "seed"}

  def replace(self, **changes: Any) -> "SamplingConfig":
    return dataclasses.replace(self, **changes)


def repetition_weights(history: jax.Array, count: jax.Array, vocab: int, window: jax.Array,
                       decay: jax.Array) -> jax.Array:
  """weight[b, v] = sum over the occurrences of v among the counted tokens of decay**(distance from the newest).

  history [B, N] int: generated tokens, the first `count` of them valid; window: 0 = all valid tokens.
  Returns [B, V] float32 (the original's `mask`; plain counts when decay = 1).
  """
  b, n = history.shape
  slot = jnp.arange(n)
  distance = count - 1 - slot  # 0 for the newest token
  counted = (slot < count) & ((window <= 0) | (distance < window))
  contrib = jnp.where(counted, decay ** jnp.maximum(distance, 0).astype(jnp.float32), 0.0)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
  return jnp.zeros((b, vocab), jnp.float32).at[rows, history].add(jnp.broadcast_to(contrib, (b, n)))


def apply_repetition_penalty(logits: jax.Array, weights: jax.Array, penalty: jax.Array,
                             max_penalty: jax.Array) -> jax.Array:
  """The original's formula: logit *= (logit < 0 ? penalty : 1 / penalty) ** weight, the factor clamped.

  logits, weights [B, V]; max_penalty 0 = no clamp. -inf logits stay -inf.
  """
  factor = jnp.where(logits < 0, penalty, 1.0 / penalty) ** weights
  clamped = jnp.clip(factor, 1.0 / max_penalty, max_penalty)
  factor = jnp.where(max_penalty > 0, clamped, factor)
  return logits * factor


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
  """logits [B, V] with every token outside the kept set at -inf.

  Each filter keeps a prefix of the tokens sorted by probability (ties: lower id first), all computed on the
  same distribution, so together they keep the shortest of those prefixes (as the reference intersects
  top-k and top-p); the most likely token is always kept.
  """
  b, v = logits.shape
  order = jnp.argsort(-logits, axis=-1, stable=True)  # [B, V] token ids, most likely first
  probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
  rank = jnp.arange(v)
  keep = (top_k <= 0) | (rank < top_k)
  # the mass before this token hasn't reached p yet (p = 1 keeps all: a float32 cumsum can hit 1.0 early)
  keep &= ((jnp.cumsum(probs, axis=-1) - probs) < top_p) | (top_p >= 1)
  keep &= probs >= min_p * probs[:, :1]
  keep |= rank == 0
  keep_by_id = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], order].set(keep)
  return jnp.where(keep_by_id, logits, -jnp.inf)


def row_keys(seed: jax.Array, row_ids: jax.Array) -> jax.Array:
  """One PRNG key per row [B], from the seed and the row's index in the request (not in the batch).

  A prompt samples the same tokens whether it runs alone or in a batch, at any batch position.
  """
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(row_ids)


def next_token(logits: jax.Array, params: dict[str, jax.Array], keys: jax.Array, step: jax.Array,
               history: jax.Array, count: jax.Array, *, greedy: bool, penalize: bool) -> jax.Array:
  """Chooses the next token of every row.

  logits [B, V] float32; params: SamplingConfig.arrays(); keys [B] per-row keys; step: the index of the
  token being chosen (folded into the keys); history [B, N] / count: the tokens generated so far.
  Returns [B] int32.
  """
  if penalize:
    weights = repetition_weights(history, count, logits.shape[-1], params["repetition_window"],
                                 params["repetition_decay"])
    logits = apply_repetition_penalty(logits, weights, params["repetition_penalty"],
                                      params["max_repetition_penalty"])
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / params["temperature"], params["top_k"], params["top_p"], params["min_p"])
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
  return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)
