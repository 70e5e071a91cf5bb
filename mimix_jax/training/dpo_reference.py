"""DPO reference log-probs: the summed completion log-probs of the stage's initial policy, as in the original
and TRL, computed in one no-grad pass over each split before the first update.

The [N, 2] (chosen, rejected) table of a split is cached in the run dir and handed to the data pipeline, which
puts each record's row into its batch as `reference_logps`; so only the policy sits in device memory, and a
resumed run reads the table instead of the initial params.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mimix_jax import io_utils
from mimix_jax.data import batch as batch_lib, shards
from mimix_jax.model import sharding, transformer
from mimix_jax.training import checkpoints
from mimix_jax.training.step import TrainStep


def tables(cfg: ml_collections.ConfigDict, step: TrainStep, params: dict | None, run_dir: Path
           ) -> dict[str, np.ndarray]:
  """{"train": [N, 2], "eval": [M, 2] if there is an eval split} float32. `params`: the stage's initial params,
  or None for a resumed run (the cached tables are read; if one is missing, the initial params are loaded)."""
  splits = {"train": cfg.data.train_path, **({"eval": cfg.data.eval_path} if cfg.data.eval_path else {})}
  caches = {name: run_dir / f"reference_logps_{name}.npy" for name in splits}
  logps = jax.jit(lambda p, b: step.objective.sequence_logps(transformer.from_params(step.model_cfg, p), b),
                  out_shardings=NamedSharding(step.mesh, P()))
  out = {}
  for name, path in splits.items():
    if caches[name].exists():
      out[name] = np.load(caches[name])
      continue
    if params is None:
      params = _initial_params(cfg, step)
    out[name] = _precompute(step, logps, params, path, cfg.seed)
    if jax.process_index() == 0:
      with io_utils.atomic_file(caches[name]) as tmp:
        np.save(tmp, out[name])
  return out


def _initial_params(cfg: ml_collections.ConfigDict, step: TrainStep) -> dict:
  """The params the stage started from, for a resumed run that needs the reference again."""
  if cfg.init_from:
    return checkpoints.load_params(cfg.init_from, step.model_cfg, step.state_shardings["params"])
  return step.init_state(cfg.seed)["params"]


def _precompute(step: TrainStep, logps, params: dict, path: str, seed: int) -> np.ndarray:
  """logps(params, batch) [b, 2] over one pass of the split, placed by record index."""
  n = int(shards.read_manifest(path)["examples"])
  table = np.zeros((n, 2), np.float32)
  with sharding.activate(step.mesh):
    for local in step.eval_iterator(path, seed):
      rows = np.asarray(logps(params, step.device_batch(local, accumulate=False, fields=batch_lib.FIELDS)))
      index = multihost_utils.process_allgather(local["index"], tiled=True) if jax.process_count() > 1 else local["index"]
      real = (index >= 0) & (index < n)
      table[index[real]] = rows[real]
  return table
