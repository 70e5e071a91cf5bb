"""Per-token log-likelihoods of targets from the final hidden states, chunked over positions.

For per-sequence sums (DPO), held-out losses and benchmark scoring (target_logprobs); the train loss uses the fused
version in training/losses.py, built on the same chunking. All sums are float32.
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
  """hc [..., d], table [V, d] (compute dtype) -> float32 logits [..., V] (padding -inf) and lse [...]."""
  logits = mask_padded_vocab(project(hc, table.T, preferred_element_type=jnp.float32), vocab_size)
  return logits, jax.nn.logsumexp(logits, axis=-1)


def target_logprobs(h: jax.Array, table: jax.Array, targets: jax.Array, vocab_size: int, chunk: int = 0):
  """log p(target) float32 [N] and whether the target is the argmax [N] at N positions (for scoring).

  h [N, d] final hidden states, table [V_padded, d], targets [N] int. "The argmax" is the first index of the
  largest logit, as torch.argmax and jnp.argmax break ties, found by counting the earlier indices that reach the
  maximum: XLA:CPU's argmax (a variadic reduce) took twice as long as the rest of this together. chunk > 0 (it
  must divide N) runs `chunk` positions at a time, so that on a CPU one [chunk, V] block stays in cache through
  the max, exp-sum and compare passes: 3x faster than [N, V] at once at V 4096. log p is
  (x_t - max) - log(sum(exp(x - max))), jax.nn.log_softmax's own arithmetic.
  """
  table = table.astype(h.dtype)

  def of_chunk(args):
    hc, tc = args
    logits, _ = chunk_logits(hc, table, vocab_size)  # [c, V]; XLA drops the unused lse
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)  # [c, V], 0 at the maximum
    target = jnp.take_along_axis(shifted, tc[:, None], axis=-1)[:, 0]
    logp = target - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    earlier = jnp.arange(shifted.shape[-1])[None, :] < tc[:, None]
    ties_before = jnp.sum((shifted >= 0) & earlier, axis=-1)
    return logp, (target >= 0) & (ties_before == 0)

  n = h.shape[0]
  chunk = chunk_size(chunk, n)
  if chunk == n:
    return of_chunk((h, targets))
  logp, hit = jax.lax.map(of_chunk, (h.reshape(n // chunk, chunk, -1), targets.reshape(n // chunk, chunk)))
  return logp.reshape(n), hit.reshape(n)
