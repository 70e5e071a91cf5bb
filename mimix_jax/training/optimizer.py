"""AdamW with a warmup + decay schedule, decoupled weight decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

NO_DECAY = ("embed", "attn_norm", "mlp_norm", "final_norm")
SCHEDULES = ("cosine", "linear", "constant")


def schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate at optimizer step s (0-based).

  Linear warmup that reaches the peak at step warmup_steps - 1 (the first update already moves: the original's
  DeepSpeed run alternated peak/0 in its first two updates), then cosine or linear decay to lr * min_lr_ratio at
  total_steps, or constant.
  """
  peak, warmup, floor = opt.lr, max(opt.warmup_steps, 0), opt.lr * opt.min_lr_ratio
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {opt.schedule!r}")

  def lr(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    progress = jnp.clip((step + 1 - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
    if opt.schedule == "cosine":
      decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    elif opt.schedule == "linear":
      decayed = peak - (peak - floor) * progress
    else:
      decayed = jnp.asarray(peak, jnp.float32)
    return jnp.where(step < warmup, warm, decayed)

  return lr


def decay_mask(params: dict, decay_norms_and_embeddings: bool) -> dict:
  """True for the params that get weight decay: matrices, not norms or the embedding (unless asked)."""
  def keep(path, _):
    name = getattr(path[-1], "key", "")
    return decay_norms_and_embeddings or name not in NO_DECAY
  return jax.tree_util.tree_map_with_path(keep, params)


def make(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  chain = []
  if opt.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt.clip_norm))
  chain.append(optax.adamw(
      learning_rate=schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
      mask=lambda p: decay_mask(p, opt.decay_norms_and_embeddings)))
  return optax.chain(*chain)
