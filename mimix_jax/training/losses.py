"""Losses: fused, chunked next-token cross-entropy, and DPO on summed float32 sequence log-probs.

Every loss returns a SUM and the count it should be divided by, so that gradient accumulation and data
parallelism divide once by the global count: the update equals one big batch, and no mean of per-device
means is taken.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mimix_jax.data import batch as batch_lib
from mimix_jax.model.layers import project
from mimix_jax.model.logprobs import chunk_logits, chunk_size, chunks, token_nll, unchunk

DPO_LOSSES = ("sigmoid", "ipo")


def _weighted_sums(h, rows, lse, weights, z_loss):
  """(sum w (nll + z lse^2), sum w nll) from lse [B, T] and the targets' output-projection rows [B, T, d]."""
  target_logit = jnp.einsum("btd,btd->bt", h, rows, preferred_element_type=jnp.float32)
  nll_sum = jnp.sum(weights * (lse - target_logit))
  return nll_sum + z_loss * jnp.sum(weights * lse * lse), nll_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def fused_token_loss(h, table, targets, weights, vocab_size: int, z_loss: float, chunk: int):
  """Weighted next-token loss on the final hidden states, with the gradients computed in the forward pass.

  h [B, T, d] (compute dtype), table [V_padded, d] float32 (the output projection), targets [B, T] int,
  weights [B, T] float32 (the loss mask). Returns (sum w (nll + z_loss lse^2), sum w nll), float32.

  The loss is the last thing a train step computes, so d loss / d logits = w ((1 + 2 z lse) softmax - onehot) is
  known as soon as a chunk's logits are: each chunk of `chunk` positions (0 = all) turns its [B, chunk, V] logits
  into its share of dh and d table and drops them. No logits are kept for the backward pass and none are
  recomputed (jax.checkpoint chunking runs the [V, d] matmul four times, this three). The one-hot part of the
  gradient is a gather / scatter of embedding rows, so no [B, T, V] one-hot exists either. Under a mesh whose
  data / fsdp axes split the batch, each device runs its own rows (shard_map) and d table is reduced once.
  Only the first output is differentiable; the second is a metric.
  """
  chunk = chunk_size(chunk, h.shape[1])
  tbl = table.astype(h.dtype)
  lse = unchunk(jax.lax.map(lambda hc: chunk_logits(hc, tbl, vocab_size)[1], chunks(h, chunk)))
  return _weighted_sums(h, tbl[targets], lse, weights, z_loss)


def _fused_fwd(h, table, targets, weights, vocab_size, z_loss, chunk):
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
  fwd = functools.partial(_loss_and_grads, vocab_size=vocab_size, z_loss=z_loss,
                          chunk=chunk_size(chunk, h.shape[1]), batch_axes=batch_axes)
  if batch_axes:
    # Under plain jit the scan carry would be all-reduced after every chunk ([V, d] float32, 206 MB for
    # gpt_large, 4-8 times a micro-batch); here each device sums its own rows and chunks, then one psum.
    rows, whole = P(batch_axes), P()
    fwd = jax.shard_map(fwd, in_specs=(rows, whole, rows, rows), out_specs=((whole, whole), (rows, whole)))
  sums, (dh, d_table) = fwd(h, table.astype(h.dtype), targets, weights)
  return sums, (dh, d_table.astype(table.dtype))


def _loss_and_grads(h, table, targets, weights, *, vocab_size, z_loss, chunk, batch_axes):
  """((total, nll sum), (d total / d h, d total / d table float32)); table in the compute dtype."""

  def one_chunk(d_table, xs):
    hc, wc = xs
    logits, lse = chunk_logits(hc, table, vocab_size)
    # The softmax part of d loss / d logits; the one-hot part is added below from embedding rows.
    g = (jnp.exp(logits - lse[..., None]) * (wc * (1 + 2 * z_loss * lse))[..., None]).astype(h.dtype)
    g2, h2 = g.reshape(-1, g.shape[-1]), hc.reshape(-1, hc.shape[-1])  # 2-D: XLA:CPU runs 3-D einsums slower
    d_table += jnp.dot(g2.T, h2, preferred_element_type=jnp.float32)
    return d_table, (project(g, table), lse)

  zeros = jnp.zeros(table.shape, jnp.float32)
  if batch_axes:  # the carry holds this device's partial sum
    zeros = jax.lax.pcast(zeros, batch_axes, to="varying")
  d_table, (dh, lse) = jax.lax.scan(one_chunk, zeros, (chunks(h, chunk), chunks(weights, chunk)))
  rows = table[targets]  # [B, T, d]
  dh = unchunk(dh) - (weights[..., None] * rows).astype(h.dtype)
  d_table = d_table.at[targets.reshape(-1)].add(-(weights[..., None] * h).reshape(-1, h.shape[-1]))
  sums = _weighted_sums(h, rows, unchunk(lse), weights, z_loss)
  if batch_axes:
    sums, d_table = jax.lax.psum((sums, d_table), batch_axes)
  return sums, (dh, d_table)


def _fused_bwd(vocab_size, z_loss, chunk, residuals, cotangents):
  dh, d_table = residuals
  ct = cotangents[0]  # the nll metric carries no gradient
  return (ct * dh).astype(dh.dtype), ct * d_table, None, None


fused_token_loss.defvjp(_fused_fwd, _fused_bwd)


def lm_loss(model, batch: dict, z_loss: float = 0.0, chunk: int = 0):
  """Token-weighted next-token loss. batch: inputs, targets, loss_mask, segment_ids, positions [B, T].

  Returns (sum of weighted NLL (+ z-loss), token count, metric sums).
  """
  h, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
  mask = batch["loss_mask"].astype(jnp.float32)
  total, nll_sum = fused_token_loss(h, model.head(), batch["targets"], mask, model.cfg.vocab_size, z_loss, chunk)
  return total, jnp.sum(mask), {"nll": jax.lax.stop_gradient(nll_sum)}


def sequence_logps(model, batch: dict, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Summed (float32) log-probs and token counts of the masked targets. batch arrays [B, 2, T] -> [B, 2]."""
  b, two, t = batch["inputs"].shape
  flat = {k: batch[k].reshape(b * two, t) for k in batch_lib.FIELDS}
  h, _ = model.hidden(flat["inputs"], flat["positions"], flat["segment_ids"])  # chosen & rejected in one pass
  nll, _ = token_nll(h, model.head(), flat["targets"], model.cfg.vocab_size, chunk)
  mask = flat["loss_mask"].astype(jnp.float32)
  return -jnp.sum(nll * mask, -1).reshape(b, two), jnp.sum(mask, -1).reshape(b, two)


def dpo_terms(policy_logps, reference_logps, counts, *, beta, loss_type="sigmoid", label_smoothing=0.0):
  """Per-pair DPO loss, SFT loss and rewards. *_logps, counts: [B, 2] (chosen, rejected), float32.

  sigmoid: -(1 - ls) log s(beta m) - ls log s(-beta m) with m = (pi_c - ref_c) - (pi_r - ref_r) (cDPO when ls > 0);
  ipo: (m - 1 / (2 beta))^2 on the same summed log-ratios.
  Pairs with no completion tokens (fully truncated) get zero loss and weight instead of NaN.
  """
  valid = (counts[:, 0] > 0) & (counts[:, 1] > 0)
  ratios = policy_logps - reference_logps  # [B, 2]
  margin = ratios[:, 0] - ratios[:, 1]
  if loss_type == "sigmoid":
    dpo = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * margin) - label_smoothing * jax.nn.log_sigmoid(-beta * margin)
  elif loss_type == "ipo":
    dpo = jnp.square(margin - 1 / (2 * beta))
  else:
    raise ValueError(f"dpo.loss_type must be one of {', '.join(DPO_LOSSES)}, got {loss_type!r}")
  sft = -policy_logps[:, 0] / jnp.maximum(counts[:, 0], 1)  # mean token NLL of the chosen completion
  rewards = beta * ratios
  zero = jnp.zeros_like(dpo)
  return dict(
      dpo=jnp.where(valid, dpo, zero), sft=jnp.where(valid, sft, zero), valid=valid.astype(jnp.float32),
      rewards_chosen=rewards[:, 0], rewards_rejected=rewards[:, 1],
      correct=(rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
      logps_chosen=policy_logps[:, 0], logps_rejected=policy_logps[:, 1])


def dpo_loss(model, batch: dict, reference_logps, *, beta, loss_type, label_smoothing, dpo_weight, sft_weight,
             chunk: int = 0):
  """Sum over pairs of dpo_weight * DPO + sft_weight * SFT, the number of valid pairs, and metric sums.

  The original's weighting is dpo_weight 0.1, sft_weight 1 (loss = sft + 0.1 dpo); TRL's RPO is dpo_weight 1,
  sft_weight alpha.
  """
  logps, counts = sequence_logps(model, batch, chunk)
  terms = dpo_terms(logps, reference_logps, counts, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
  valid = terms["valid"]
  total = jnp.sum(dpo_weight * terms["dpo"] + sft_weight * terms["sft"])
  sums = {
      "dpo": jnp.sum(terms["dpo"]), "sft": jnp.sum(terms["sft"]),
      "rewards/chosen": jnp.sum(terms["rewards_chosen"] * valid),
      "rewards/rejected": jnp.sum(terms["rewards_rejected"] * valid),
      "rewards/accuracies": jnp.sum(terms["correct"] * valid),
      "rewards/margins": jnp.sum((terms["rewards_chosen"] - terms["rewards_rejected"]) * valid),
      "logps/chosen": jnp.sum(terms["logps_chosen"] * valid),
      "logps/rejected": jnp.sum(terms["logps_rejected"] * valid),
  }
  return total, jnp.sum(valid), sums
