"""Small operations the model, the losses and the decode engine share."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32 (scale included), cast back to x.dtype, as the original does."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * scale.astype(jnp.float32)
  return y.astype(x.dtype)


def project(x: jax.Array, w: jax.Array, n_contract: int = 1, preferred_element_type=None) -> jax.Array:
  """x [..., *in] @ w [*in, *out] -> [..., *out], as one 2-D matmul [N, in] @ [in, out].

  The same as an einsum, but XLA:CPU runs the gradients of 3-D einsums (two contracting dims for dW) about 1.5x
  slower than the flattened matmul; on GPU both compile to the same GEMMs.
  """
  lead, k = x.shape[: x.ndim - n_contract], math.prod(x.shape[x.ndim - n_contract:])
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *w.shape[n_contract:])


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
  """Padded-vocabulary logits -> -inf, as an added [V] bias (its gradient is the identity: no select)."""
  if logits.shape[-1] == vocab_size:
    return logits
  return logits + jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, 0.0, -jnp.inf).astype(logits.dtype)
