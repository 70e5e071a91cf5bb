"""Per-token log-likelihoods of targets from the final hidden states, chunked over positions.

For per-sequence sums (DPO), held-out losses and benchmark scoring; the train loss uses the fused version in
training/losses.py, built on the same chunking. All sums are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimix_jax.model.layers import mask_padded_vocab, project


def token_nll(h: jax.Array, table: jax.Array, targets: jax.Array, vocab_size: int, chunk: int = 0):
  """Per-token NLL and logsumexp in float32. h [B, T, d] final hidden states; table [V_padded, d]; targets [B, T].

  chunk > 0 processes `chunk` positions at a time under jax.checkpoint, so peak memory holds one [B, chunk, V]
  logits block instead of [B, T, V]. Returns nll [B, T], lse [B, T].
  """
  table = table.astype(h.dtype)

  def nll_of(args):
    hc, tc = args
    lse = chunk_logits(hc, table, vocab_size)[1]
    # The target's logit from its embedding row: O(B c d) and a cheap row gather in the backward pass, instead of
    # a take_along_axis over [B, c, V] whose gradient scatters into a zeroed [B, c, V] buffer.
    target_logit = jnp.einsum("bcd,bcd->bc", hc, table[tc], preferred_element_type=jnp.float32)
    return lse - target_logit, lse

  chunk = chunk_size(chunk, h.shape[1])
  if chunk == h.shape[1]:
    return nll_of((h, targets))
  nll, lse = jax.lax.map(jax.checkpoint(nll_of), (chunks(h, chunk), chunks(targets, chunk)))
  return unchunk(nll), unchunk(lse)


def chunk_size(chunk: int, t: int) -> int:
  """loss_chunk -> positions per chunk: 0 (or >= T) means all T at once; otherwise it must divide T."""
  if chunk <= 0 or chunk >= t:
    return t
  if t % chunk:
    raise ValueError(f"loss_chunk {chunk} does not divide the sequence length {t}")
  return chunk


def chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, T, ...] -> [T / chunk, B, chunk, ...]: chunks along the length, the (sharded) batch axis kept whole."""
  b, t = x.shape[:2]
  return x.reshape(b, t // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def unchunk(x: jax.Array) -> jax.Array:
  n, b, c = x.shape[:3]
  return x.swapaxes(0, 1).reshape(b, n * c, *x.shape[3:])


def chunk_logits(hc: jax.Array, table: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """hc [B, c, d], table [V, d] (compute dtype) -> float32 logits [B, c, V] (padding -inf) and lse [B, c]."""
  logits = mask_padded_vocab(project(hc, table.T, preferred_element_type=jnp.float32), vocab_size)
  return logits, jax.nn.logsumexp(logits, axis=-1)
