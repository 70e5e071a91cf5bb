"""AdamW with a warmup + decay schedule, decoupled weight decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import ml_collections
import optax

NO_DECAY = ("embed", "attn_norm", "mlp_norm", "final_norm")
SCHEDULES = ("cosine", "linear", "constant")


def schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate at optimizer step s (0-based): optax's warmup schedules evaluated at s + 1.

  So the linear warmup reaches the peak at step warmup_steps - 1 and the first update already moves (the
  original's DeepSpeed run alternated peak and 0 in its first two updates); then cosine or linear decay to
  lr * min_lr_ratio at total_steps, or constant.
  """
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {opt.schedule!r}")
  peak, warmup, floor = opt.lr, max(opt.warmup_steps, 0), opt.lr * opt.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  decay = {
      "cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=floor / peak if peak else 0.0),
      "linear": optax.linear_schedule(peak, floor, decay_steps),
      "constant": optax.constant_schedule(peak),
  }[opt.schedule]
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  lr = optax.join_schedules([warm, decay], [warmup])
  return lambda step: lr(step + 1)


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
