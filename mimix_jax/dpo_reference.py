"""DPO reference-model log-probs: the policy at the start of the stage (init_from), as in the reference and TRL.

Two ways, by `dpo.reference`:
  precompute  one no-grad pass over each split before the first update; the [N, 2] (chosen, rejected) table is kept
              on the host and cached in the run dir, so only the policy sits in device memory (the default).
  frozen      a frozen copy of the initial params on the devices computes each batch's log-probs as it comes
              (no pre-pass, one more model in memory).
Both give `lookup(local_batch) -> np.ndarray [b, 2]` float32 summed log-probs.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mimix_jax import checkpoint, data as data_lib, losses


def _logps_fn(trainer, chunk: int):
  """jit(params, batch [b, 2, T]) -> summed completion log-probs [b, 2], replicated on every device."""
  return jax.jit(lambda p, b: losses.sequence_logps(nnx.merge(trainer.graphdef, p), b, chunk)[0],
                 out_shardings=NamedSharding(trainer.mesh, P()))


class Precomputed:
  def __init__(self, table: np.ndarray):
    self.table = table  # [N, 2]

  def lookup(self, local: dict[str, np.ndarray]) -> np.ndarray:
    return self.table[np.clip(local["index"], 0, len(self.table) - 1)]  # padding rows (index -1) are masked anyway


class Frozen:
  def __init__(self, trainer, params, chunk: int):
    self.trainer, self.fn = trainer, _logps_fn(trainer, chunk)
    self.params = jax.tree.map(lambda x: x.copy(), params)  # the train state is donated: keep our own copy

  def lookup(self, local: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(self.fn(self.params, self.trainer.device_batch(local, accumulate=False)))


def build(cfg, trainer, params, run_dir: Path, resumed: bool) -> dict[str, Precomputed | Frozen]:
  """References for the train (and eval) split. `params` are the stage's initial params unless `resumed`."""
  if cfg.dpo.reference not in ("precompute", "frozen"):
    raise ValueError(f"dpo.reference must be precompute or frozen, got {cfg.dpo.reference!r}")
  splits = {"train": cfg.data.train_path, **({"eval": cfg.data.eval_path} if cfg.data.eval_path else {})}
  caches = {name: run_dir / f"reference_logps_{name}.npy" for name in splits}
  if resumed and (cfg.dpo.reference == "frozen" or not all(c.exists() for c in caches.values())):
    params = _initial_params(cfg, trainer)
  if cfg.dpo.reference == "frozen":
    frozen = Frozen(trainer, params, cfg.loss_chunk)
    return {name: frozen for name in splits}
  return {name: Precomputed(np.load(caches[name])) if caches[name].exists()
          else _precompute(cfg, trainer, params, splits[name], caches[name]) for name in splits}


def _initial_params(cfg, trainer):
  """The params the stage started from, for a resumed run that needs the reference again."""
  if cfg.init_from:
    return checkpoint.load_params(cfg.init_from, trainer.model_cfg, trainer.state_shardings["params"])
  return trainer.init_state(cfg.seed)["params"]


def _precompute(cfg, trainer, params, path: str, cache: Path) -> Precomputed:
  n = int(data_lib.read_manifest(path)["examples"])
  micro = cfg.batch_size // cfg.grad_accum_steps
  iterator = data_lib.make_iterator(
      path, stage="dpo", global_batch_size=micro, seed=cfg.seed, shuffle=False, num_epochs=1,
      process_index=jax.process_index(), process_count=jax.process_count(), drop_remainder=False)
  fn = _logps_fn(trainer, cfg.loss_chunk)
  table = np.zeros((n, 2), np.float32)
  for local in iterator:
    logps = np.asarray(fn(params, trainer.device_batch(local, accumulate=False)))
    index = multihost_utils.process_allgather(local["index"], tiled=True) if jax.process_count() > 1 else local["index"]
    real = (index >= 0) & (index < n)
    table[index[real]] = logps[real]
  if jax.process_index() == 0:
    tmp = cache.with_name(cache.name + ".tmp.npy")
    np.save(tmp, table)
    os.replace(tmp, cache)
  return Precomputed(table)
