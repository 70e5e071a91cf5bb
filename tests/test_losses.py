"""The fused cross-entropy against the plain formula: full float32 logits, log-softmax, autodiff."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimix_jax.model import sharding
from mimix_jax.model.logprobs import target_logprobs, token_nll
from mimix_jax.training import losses

B, T, D, VOCAB, PADDED = 3, 16, 8, 37, 40  # 3 padded vocabulary rows that must never be predicted


def plain_loss(h, table, targets, weights, z_loss):
  """sum w (nll + z lse^2) and sum w nll, written the obvious way."""
  logits = jnp.einsum("btd,vd->btv", h.astype(jnp.float32), table)[..., :VOCAB]
  lse = jax.nn.logsumexp(logits, -1)
  nll = lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return jnp.sum(weights * nll) + z_loss * jnp.sum(weights * lse ** 2), jnp.sum(weights * nll)


def inputs(seed=0, batch=B):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(batch, T, D)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(PADDED, D)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, VOCAB, (batch, T)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, (batch, T)), jnp.float32)  # a loss mask with holes
  return h, table, targets, weights


@pytest.mark.parametrize("chunk", [0, 4, 8, 16])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_fused_loss_value_and_gradients_equal_autodiff_of_the_plain_loss(chunk, z_loss):
  h, table, targets, weights = inputs()
  fused = lambda h, table: losses.fused_token_loss(h, table, targets, weights, VOCAB, z_loss, chunk)
  total, nll = fused(h, table)
  grads = jax.grad(lambda *a: fused(*a)[0], argnums=(0, 1))(h, table)
  exp_total, exp_nll = plain_loss(h, table, targets, weights, z_loss)
  exp_grads = jax.grad(lambda *a: plain_loss(*a, targets, weights, z_loss)[0], argnums=(0, 1))(h, table)
  np.testing.assert_allclose(float(total), float(exp_total), rtol=1e-6)
  np.testing.assert_allclose(float(nll), float(exp_nll), rtol=1e-6)
  for got, expected in zip(grads, exp_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(grads[1])[VOCAB:] == 0)  # padded rows get no gradient


def test_fused_loss_under_jit_and_a_scaled_cotangent():
  h, table, targets, weights = inputs(1)
  fused = jax.jit(jax.grad(lambda h, t: 3.0 * losses.fused_token_loss(h, t, targets, weights, VOCAB, 0.0, 4)[0],
                           argnums=(0, 1)))
  expected = jax.grad(lambda h, t: 3.0 * plain_loss(h, t, targets, weights, 0.0)[0], argnums=(0, 1))(h, table)
  for got, exp in zip(fused(h, table), expected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-5, atol=1e-5)


def test_fused_loss_in_bfloat16_stays_close_to_float32():
  h, table, targets, weights = inputs(2)
  grad = lambda h: jax.grad(lambda h, t: losses.fused_token_loss(h, t, targets, weights, VOCAB, 0.0, 8)[0],
                            argnums=(0, 1))(h, table)
  g16, g32 = grad(h.astype(jnp.bfloat16)), grad(h)
  assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.float32
  for a, b in zip(g16, g32):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), rtol=0.05, atol=0.05)


def test_token_nll_and_fused_loss_agree_and_a_bad_chunk_is_refused():
  h, table, targets, weights = inputs(3)
  nll, _ = token_nll(h, table, targets, VOCAB, chunk=4)
  total, _ = losses.fused_token_loss(h, table, targets, weights, VOCAB, 0.0, 0)
  np.testing.assert_allclose(float(jnp.sum(nll * weights)), float(total), rtol=1e-6)
  with pytest.raises(ValueError, match="loss_chunk 5 does not divide the sequence length 16"):
    losses.fused_token_loss(h, table, targets, weights, VOCAB, 0.0, 5)


@pytest.mark.parametrize("chunk", [0, 4])
def test_target_logprobs_equal_log_softmax_and_argmax_with_ties_and_vocab_padding(chunk):
  rng = np.random.default_rng(5)
  d, vocab, padded = 8, 13, 16
  table = rng.normal(size=(padded, d)).astype(np.float32)
  table[7] = table[3]  # ids 3 and 7 always tie: argmax picks 3, the first
  h = rng.normal(size=(16, d)).astype(np.float32)
  h[:4] = table[3] * 3  # positions whose largest logit is the tied pair
  targets = np.array([3, 7, 3, 7, *rng.integers(0, vocab, 12)], np.int32)
  logp, hit = jax.jit(lambda h, t: target_logprobs(h, jnp.asarray(table), t, vocab, chunk))(h, targets)
  logits = (h @ table.T)[:, :vocab]  # padded ids never win nor count
  want = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)[np.arange(16), targets]
  np.testing.assert_allclose(np.asarray(logp), np.asarray(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(hit), logits.argmax(-1) == targets)
  assert list(np.asarray(hit)[:4]) == [True, False, True, False]


def test_on_a_mesh_the_chunk_loop_sums_locally_and_reduces_once():
  if jax.device_count() < 8:
    pytest.skip("needs 8 virtual devices")
  args = inputs(4, batch=4)  # rows divisible by data x fsdp
  grad = jax.jit(jax.grad(lambda h, table, targets, weights: losses.fused_token_loss(
      h, table, targets, weights, VOCAB, 1e-2, 4)[0], argnums=(0, 1)))
  expected = grad(*args)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  with sharding.activate(mesh):
    args = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in args]  # the table too: FSDP-like
    got = grad(*args)
    hlo = grad.lower(*args).compile().as_text()
  for a, b in zip(got, expected):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
  assert bodies  # the chunk loop
  for body in bodies:
    text = hlo[hlo.index(f"%{body} "):]
    text = text[: text.index("\n}\n")]
    assert "all-reduce" not in text, f"a collective runs in every chunk ({body})"
