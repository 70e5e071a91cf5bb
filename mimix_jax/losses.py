"""Losses: chunked next-token cross-entropy, and DPO on summed float32 sequence log-probs.

Every loss returns a SUM and the count it should be divided by, so that gradient accumulation and data
parallelism divide once by the global count: the update equals one big batch, and no mean of per-device
means is taken.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimix_jax.model import mask_padded_vocab, project


def token_nll(h: jax.Array, table: jax.Array, targets: jax.Array, vocab_size: int, chunk: int = 0):
  """Per-token NLL and logsumexp in float32. h [B, T, d] final hidden states; table [V_padded, d]; targets [B, T].

  chunk > 0 processes `chunk` positions at a time under jax.checkpoint, so peak memory holds one [B, chunk, V]
  logits block instead of [B, T, V] (needed for large vocabularies on a GPU; on a CPU the recomputation costs
  more than the memory saves, so chunk = 0 computes everything at once). Returns nll [B, T], lse [B, T].
  """
  b, t, d = h.shape
  table = table.astype(h.dtype)

  def nll_of(hc, tc):
    logits = project(hc, table.T, preferred_element_type=jnp.float32)  # [B, c, V]
    lse = jax.nn.logsumexp(mask_padded_vocab(logits, vocab_size), axis=-1)
    # The target's logit from its embedding row: O(B c d) and a cheap row gather in the backward pass, instead of
    # a take_along_axis over [B, c, V] whose gradient scatters into a zeroed [B, c, V] buffer.
    target_logit = jnp.einsum("bcd,bcd->bc", hc, table[tc], preferred_element_type=jnp.float32)
    return lse - target_logit, lse

  if chunk <= 0 or chunk >= t:
    return nll_of(h, targets)
  if t % chunk:
    raise ValueError(f"loss_chunk {chunk} does not divide the sequence length {t}")
  hs = h.reshape(b, t // chunk, chunk, d).swapaxes(0, 1)  # [N, B, c, d]
  ts = targets.reshape(b, t // chunk, chunk).swapaxes(0, 1)  # [N, B, c]
  nll, lse = jax.lax.map(jax.checkpoint(lambda args: nll_of(*args)), (hs, ts))
  return nll.swapaxes(0, 1).reshape(b, t), lse.swapaxes(0, 1).reshape(b, t)


def lm_loss(model, batch: dict, z_loss: float = 0.0, chunk: int = 0):
  """Token-weighted next-token loss. batch: inputs, targets, loss_mask, segment_ids, positions [B, T].

  Returns (sum of weighted NLL (+ z-loss), token count, metric sums).
  """
  h, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
  nll, lse = token_nll(h, model.embed[...], batch["targets"], model.cfg.vocab_size, chunk)
  mask = batch["loss_mask"].astype(jnp.float32)
  nll_sum = jnp.sum(nll * mask)
  total = nll_sum + z_loss * jnp.sum(jnp.square(lse) * mask)
  return total, jnp.sum(mask), {"nll": nll_sum}


def sequence_logps(model, batch: dict, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Summed (float32) log-probs and token counts of the masked targets. batch arrays [B, 2, T] -> [B, 2]."""
  b, two, t = batch["inputs"].shape
  flat = {k: batch[k].reshape(b * two, t) for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  h, _ = model.hidden(flat["inputs"], flat["positions"], flat["segment_ids"])  # chosen & rejected in one pass
  nll, _ = token_nll(h, model.embed[...], flat["targets"], model.cfg.vocab_size, chunk)
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
    raise ValueError(f"dpo.loss_type must be sigmoid or ipo, got {loss_type!r}")
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

  The reference's weighting is dpo_weight 0.1, sft_weight 1 (loss = sft + 0.1 dpo); TRL's RPO is dpo_weight 1,
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
