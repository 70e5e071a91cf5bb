"""The optimizer: AdamW, or Muon for the layers' projection matrices with AdamW for the rest; the lr schedules.

Both clip by the global gradient norm first. AdamW's weight decay is decoupled and skips norms and the
embedding unless asked. Muon (Jordan et al. 2024; optax.contrib's building blocks) orthogonalises each layer's
Nesterov momentum by Newton-Schulz: our layer weights are stacked ([L, d, H, D], ...), so every layer's
projection is presented to it as its own [fan_in, fan_out] matrix (the layers axis is a batch axis), never the
stack as one. The embedding (tied to the output head), the norms and anything else stay on AdamW, as in the
modded-nanogpt records: optax.contrib.muon's default would send the [V, d] embedding to Muon too.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.contrib._muon import scale_by_shape  # optax.contrib.muon's width scale; not re-exported in 0.2.8

NO_DECAY = ("embed", "attn_norm", "mlp_norm", "final_norm")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
# Float32 buffers the optimizer keeps per parameter (the planner's note; the numbers come from the real state).
STATE_PER_PARAM = {"adamw": "2 Adam moments for every parameter",
                   "muon": "1 Muon momentum for the projection matrices, 2 Adam moments for the rest"}


def schedule(opt: ml_collections.ConfigDict, total_steps: int, peak: float | None = None) -> optax.Schedule:
  """Learning rate at optimizer step s (0-based): optax's warmup schedules evaluated at s + 1.

  So the linear warmup reaches the peak (`opt.lr`, or `peak`) at step warmup_steps - 1 and the first update
  already moves (the original's DeepSpeed run alternated peak and 0 in its first two updates); then cosine or
  linear decay to peak * min_lr_ratio at total_steps, constant, or wsd: constant until the last
  decay_fraction of total_steps, which decay linearly to the floor.
  """
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {opt.schedule!r}")
  if not 0.0 <= opt.decay_fraction <= 1.0:
    raise ValueError(f"optimizer.decay_fraction must be between 0 and 1, got {opt.decay_fraction}")
  peak = opt.lr if peak is None else peak
  warmup, floor = max(opt.warmup_steps, 0), peak * opt.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  wsd_decay = min(round(opt.decay_fraction * total_steps), decay_steps)
  stages = {  # the stages after warmup, and the steps at which each later one starts
      "cosine": ([optax.cosine_decay_schedule(peak, decay_steps, alpha=floor / peak if peak else 0.0)], []),
      "linear": ([optax.linear_schedule(peak, floor, decay_steps)], []),
      "constant": ([optax.constant_schedule(peak)], []),
      # No decay stage at all for decay_fraction 0: optax's linear schedule at its start is
      # (peak - floor) + floor, which can be 1 ulp off the peak, and a run extended later must match bitwise.
      "wsd": ([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, wsd_decay)],
              [total_steps - wsd_decay]) if wsd_decay else ([optax.constant_schedule(peak)], []),
  }
  after, boundaries = stages[opt.schedule]
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  lr = optax.join_schedules([warm, *after], [warmup, *boundaries])
  return lambda step: lr(step + 1)


def decay_mask(params: dict, decay_norms_and_embeddings: bool) -> dict:
  """True for the params that get weight decay: matrices, not norms or the embedding (unless asked)."""
  def keep(path, _):
    name = getattr(path[-1], "key", "")
    return decay_norms_and_embeddings or name not in NO_DECAY
  return jax.tree_util.tree_map_with_path(keep, params)


def muon_dimensions(params: Any, input_axes: dict[str, int]) -> Any:
  """Per param: the MuonDimensionNumbers of a stacked layer projection [L, *fan_in, *fan_out] (axis 0, the
  layers, is a batch axis: orthogonalised one layer at a time), or None for the params AdamW keeps.

  `input_axes`: projection name -> number of its fan-in axes (ModelConfig.projection_input_axes).
  Masked-out leaves (optax.MaskedNode, inside the partition) stay masked.
  """
  def one(path, x):
    if isinstance(x, optax.MaskedNode):
      return x
    keys = [getattr(k, "key", None) for k in path]
    if len(keys) != 2 or keys[0] != "layers" or keys[1] not in input_axes:
      return None
    n_in = input_axes[keys[1]]
    return MuonDimensionNumbers(reduction_axis=tuple(range(1, 1 + n_in)), output_axis=tuple(range(1 + n_in, x.ndim)))
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def _adamw(opt: ml_collections.ConfigDict, total_steps: int, input_axes: dict[str, int] | None = None
           ) -> optax.GradientTransformation:
  del input_axes  # AdamW treats matrices like any other param
  return optax.adamw(
      learning_rate=schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
      mask=lambda p: decay_mask(p, opt.decay_norms_and_embeddings))


def _muon(opt: ml_collections.ConfigDict, total_steps: int, input_axes: dict[str, int]) -> optax.GradientTransformation:
  """optax.contrib.muon's Muon branch (Nesterov momentum, Newton-Schulz, the sqrt(max(1, fan_out / fan_in))
  width scale, decoupled weight decay, lr), fed only the projections; our AdamW takes the rest."""
  dims = lambda p: muon_dimensions(p, input_axes)
  labels = lambda p: jax.tree.map(lambda d: "adamw" if d is None else "muon", dims(p),
                                  is_leaf=lambda d: d is None or isinstance(d, MuonDimensionNumbers))
  muon = optax.chain(
      scale_by_muon(beta=opt.muon_momentum, ns_steps=opt.muon_ns_steps, weight_dimension_numbers=dims),
      scale_by_shape(weight_dimension_numbers=dims),
      optax.add_decayed_weights(opt.muon_weight_decay),
      optax.scale_by_learning_rate(schedule(opt, total_steps, peak=opt.muon_lr)))
  return optax.partition({"muon": muon, "adamw": _adamw(opt, total_steps)}, labels)


def make(opt: ml_collections.ConfigDict, total_steps: int, input_axes: dict[str, int]) -> optax.GradientTransformation:
  """The configured optimizer; `input_axes` names the layer projections Muon takes (ModelConfig's)."""
  builders = {"adamw": _adamw, "muon": _muon}
  if opt.name not in builders:
    raise ValueError(f"optimizer.name must be one of {', '.join(builders)}, got {opt.name!r}")
  chain = []
  if opt.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt.clip_norm))
  chain.append(builders[opt.name](opt, total_steps, input_axes))
  return optax.chain(*chain)
