"""Rotary embeddings and grouped-query attention kernels.

Shape letters: B batch, T query length, S key length, H query heads, K kv heads, G = H/K queries per kv head,
D head dim.

Masking is one rule for training, packed documents and cached decoding alike: every token has a *slot* (its
index in the row or in the KV cache) and a *segment id* (which document it belongs to; 0 = padding).
A query attends to a key iff they share a non-zero segment and the key's slot is not after the query's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimix_jax.model import rope

_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite, so fully-masked (padding) rows stay NaN-free


def apply_rope(x: jax.Array, positions: jax.Array, max_len: int, base: float,
               scaling: rope.RopeScaling | None = None) -> jax.Array:
  """Rotate-half RoPE on x [B, T, N, D] at positions [B, T] int. Computed in float32, returned in x.dtype."""
  sin, cos = rope.sin_cos(max_len, x.shape[-1], base, scaling)
  # Clip so padding positions (which may be -1) index a valid row; those tokens are masked anyway.
  pos = jnp.clip(positions, 0, max_len - 1)
  sin = jnp.asarray(sin)[pos][:, :, None, :]  # [B, T, 1, D/2]
  cos = jnp.asarray(cos)[pos][:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
def attention_mask(q_segment: jax.Array, kv_segment: jax.Array, q_slot: jax.Array, kv_slot: jax.Array) -> jax.Array:
  """[B, T, S] bool: same non-zero segment and key slot <= query slot.

  q_segment [B, T], kv_segment [B, S], q_slot [B, T] or [T], kv_slot [S].
  """
  q_slot = jnp.broadcast_to(q_slot, q_segment.shape)
  same_doc = (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
  causal = kv_slot[None, None, :] <= q_slot[:, :, None]
  return same_doc & causal


def tree_mask(doc: jax.Array, branch: jax.Array) -> jax.Array:
  """[B, T, T] bool for rows that pack trees: a document's shared prefix (branch 0) followed by its branches
  (1, 2, ...), each continuing the prefix on its own. A query attends to earlier slots of its document that are
  in the prefix or in its own branch. doc [B, T] (0 = padding), branch [B, T]."""
  slots = jnp.arange(doc.shape[1])
  same_doc = (doc[:, :, None] == doc[:, None, :]) & (doc[:, None, :] != 0)
  on_path = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
  return same_doc & on_path & (slots[None, None, :] <= slots[None, :, None])


def mask_bias(mask: jax.Array) -> jax.Array:
  """[B, T, S] bool -> additive float32 bias (0 or a large negative), built once and shared by every layer.

  Adding a bias instead of selecting keeps the backward pass an identity for the scores (no select, no zeros).
  """
  return jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
  """Plain attention with a float32 softmax over a KV cache (prefill and decode); works on every backend.

  q [B, T, H, D], k/v [B, S, K, D], bias [B, T, S] (mask_bias) -> [B, T, H, D]. Query head h uses kv head h // G.
  The einsums read the cache in its [B, S, K, D] layout: causal_attention's [B, K, S, D] operands would copy the
  whole cache every decode step.
  """
  b, t, h, d = q.shape
  n_kv = k.shape[2]
  q = q.reshape(b, t, n_kv, h // n_kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / np.sqrt(d)
  scores = scores + bias[:, None, None, :, :]
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, q_block: int = 0) -> jax.Array:
  """Self-attention over the same T positions (training, a full forward pass), float32 softmax, every backend.

  q [B, T, H, D], k/v [B, T, K, D], bias [B, T, T] (mask_bias) -> [B, T, H, D]; the same result as xla_attention.

  q_block > 0 skips what the causal mask discards anyway: queries run in blocks of q_block (the last may be
  shorter) and a block meets only the keys up to its last query. With n blocks that is (n + 1) / 2n of the
  scores. Every matmul is batched over (B, K) with the G query heads of a kv head stacked as rows,
  [B, K, G T, D] @ [B, K, D, T]: contiguous operands for XLA:CPU's dot, which ran xla_attention's 5-D einsums
  (transposing the scores on the way) 1.4-2x slower (forward + backward of the cpu_tiny shape, alone).
  """
  b, t, h, d = q.shape
  n_kv = k.shape[2]
  g = h // n_kv
  step = q_block if 0 < q_block < t else t
  q = q.reshape(b, t, n_kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
  outs = []
  for start in range(0, t, step):
    end = min(start + step, t)  # queries [start, end) see keys [0, end)
    n = end - start
    scores = jnp.einsum("bkqd,bksd->bkqs", q[:, :, :, start:end].reshape(b, n_kv, g * n, d), k[:, :, :end],
                        preferred_element_type=jnp.float32)
    scores = scores.reshape(b, n_kv, g, n, end) / np.sqrt(d) + bias[:, None, None, start:end, :end]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, n_kv, g * n, end)
    outs.append(jnp.einsum("bkqs,bksd->bkqd", probs, v[:, :, :end]).reshape(b, n_kv, g, n, d))
  out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, implementation: str) -> jax.Array:
  """`jax.nn.dot_product_attention` (implementation "cudnn" or "xla") for training.

  q [B, T, H, D], k/v [B, T, K, D]; mask [B, T, T] bool (attention_mask) for packed documents or padding, or None
  for rows of one document each (the kernel's own causal mask, the fastest case). cuDNN applies a mask as an
  additive bias inside the fused kernel. GQA is native: query head h uses kv head h // G, as in xla_attention.
  """
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)
