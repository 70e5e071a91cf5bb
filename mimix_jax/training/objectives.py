"""What a run optimises, as values: the LM objective (pretrain, sft) and the preference objective (dpo).

An objective owns its loss, the batch fields it reads, how many sequences an example holds (tokens per step)
and the data it trains on. `from_config` is the one place that reads the objective's name; everything else asks
the object. Losses return a SUM and its count (training/losses.py), so accumulation divides once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from mimix_jax.data import batch as batch_lib
from mimix_jax.training import losses

LossResult = tuple[jax.Array, jax.Array, dict[str, jax.Array]]  # (loss sum, count, metric sums)


@dataclasses.dataclass(frozen=True)
class LMObjective:
  """Token-weighted next-token cross-entropy (+ z-loss) on the loss mask: pretraining and SFT."""

  data_stage: str  # the preprocessing stage of the shards it trains on
  z_loss: float = 0.0
  chunk: int = 0  # positions per cross-entropy chunk (0 = all)
  sequences_per_example: int = 1
  needs_reference: bool = False

  @property
  def batch_fields(self) -> tuple[str, ...]:
    return tuple(batch_lib.FIELDS)

  def loss(self, model, batch: dict[str, jax.Array]) -> LossResult:
    """batch: FIELDS [B, T]. Counts tokens."""
    return losses.lm_loss(model, batch, self.z_loss, self.chunk)


@dataclasses.dataclass(frozen=True)
class PreferenceObjective:
  """DPO (or IPO / cDPO) on chosen/rejected pairs against precomputed reference log-probs, plus an SFT term."""

  data_stage: str
  beta: float
  loss_type: str
  label_smoothing: float
  dpo_weight: float
  sft_weight: float
  chunk: int = 0
  sequences_per_example: int = 2
  needs_reference: bool = True  # batches carry reference_logps (training/dpo_reference.py)

  def __post_init__(self):
    if self.loss_type not in losses.DPO_LOSSES:
      raise ValueError(f"dpo.loss_type must be one of {', '.join(losses.DPO_LOSSES)}, got {self.loss_type!r}")

  @property
  def batch_fields(self) -> tuple[str, ...]:
    return (*batch_lib.FIELDS, batch_lib.REFERENCE_LOGPS)

  def loss(self, model, batch: dict[str, jax.Array]) -> LossResult:
    """batch: FIELDS [B, 2, T], reference_logps [B, 2]. Counts valid pairs."""
    return losses.dpo_loss(model, batch, batch[batch_lib.REFERENCE_LOGPS], beta=self.beta, loss_type=self.loss_type,
                           label_smoothing=self.label_smoothing, dpo_weight=self.dpo_weight,
                           sft_weight=self.sft_weight, chunk=self.chunk)

  def sequence_logps(self, model, batch: dict[str, jax.Array]) -> jax.Array:
    """Summed completion log-probs [B, 2] (the reference's, when `model` is the stage's initial policy)."""
    return losses.sequence_logps(model, batch, self.chunk)[0]


Objective = LMObjective | PreferenceObjective


def _lm(cfg: ml_collections.ConfigDict, data_stage: str) -> LMObjective:
  return LMObjective(data_stage, z_loss=cfg.optimizer.z_loss, chunk=cfg.loss_chunk)


def _preference(cfg: ml_collections.ConfigDict, data_stage: str) -> PreferenceObjective:
  d = cfg.dpo
  return PreferenceObjective(data_stage, beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                             dpo_weight=d.dpo_weight, sft_weight=d.sft_weight, chunk=cfg.loss_chunk)


# objective name -> (builder, the preprocessing stage of its data)
OBJECTIVES: dict[str, tuple[Any, str]] = {
    "pretrain": (_lm, "pretrain"),
    "sft": (_lm, "sft"),
    "dpo": (_preference, "dpo"),
}


def from_config(cfg: ml_collections.ConfigDict) -> Objective:
  if cfg.objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
  build, data_stage = OBJECTIVES[cfg.objective]
  return build(cfg, data_stage)
