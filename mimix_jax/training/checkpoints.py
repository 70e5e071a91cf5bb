"""Orbax checkpoints of a run: the whole train state with the data iterator's position (TrainCheckpointer), and
params-only reads and writes for the other commands.

    RUN_DIR/checkpoints/<step>/   params, opt_state, meta (step, counters), data (Grain iterator state per process)

Params are saved as a plain nested dict ({"embed": [V, d], "layers": {"wq": [L, d, H, D], ...},
"final_norm": [d]}) so that tools can read them without the optimizer state and onto any mesh.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from mimix_jax.model import transformer
from mimix_jax.model.config import ModelConfig
from mimix_jax.training.run_dir import CHECKPOINTS, read_run_info


def abstract_params(model_cfg: ModelConfig, shardings=None) -> dict:
  """ShapeDtypeStructs of the params pure dict, with target shardings (None: the default device)."""
  abstract = transformer.abstract_params(model_cfg)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def load_params(path: Path | str, model_cfg: ModelConfig | None = None, shardings=None) -> dict:
  """Params (pure dict) of a run dir or step dir, restored onto `shardings` (any mesh) without the optimizer."""
  info = read_run_info(path)
  model_cfg = model_cfg or info.model
  target = abstract_params(model_cfg, shardings)
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    return ckptr.restore(info.step_dir / "params", args=ocp.args.StandardRestore(target))


def save_params(run_dir: Path | str, step: int, params: dict) -> Path:
  """Writes a params-only checkpoint (e.g. an imported model); train/generate/export read it like any other."""
  step_dir = Path(run_dir) / CHECKPOINTS / str(step)
  with ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINTS) as mngr:
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
    mngr.wait_until_finished()
  return step_dir


class _DataState:
  """Carries a grain iterator state (JSON bytes) through grain's Orbax handler, one file per process.

  The trainer records the state of the iterator after the last batch it consumed; handing the live iterator
  to Orbax would save a position that prefetching may have moved past.
  """

  def __init__(self, state: bytes = b"{}"):
    self.state = state

  def get_state(self) -> bytes:
    return self.state

  def set_state(self, state: bytes) -> None:
    self.state = state

  def start_prefetch(self) -> None:
    pass


class TrainCheckpointer:
  """Orbax CheckpointManager for the whole train state + the data iterator state, saved asynchronously."""

  def __init__(self, run_dir: Path | str, keep: int, keep_every: int = 0):
    import grain.checkpoint as grain_ckpt
    self._grain = grain_ckpt
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every or None, enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINTS, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_state: bytes, meta: dict, force: bool = False) -> None:
    self.manager.save(step, force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        data=self._grain.CheckpointSave(_DataState(data_state))))

  def restore(self, step: int, abstract_state: dict, shardings: dict) -> tuple[dict, bytes, dict]:
    """(state on the given shardings, data iterator state, meta) of `step`, onto any mesh."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target["params"]),
        opt_state=ocp.args.StandardRestore(target["opt_state"]),
        meta=ocp.args.JsonRestore(),
        data=self._grain.CheckpointRestore(_DataState())))
    meta = restored["meta"]
    step_array = jax.device_put(jax.numpy.asarray(meta["step"], jax.numpy.int32), shardings["step"])
    state = {"params": restored["params"], "opt_state": restored["opt_state"], "step": step_array}
    return state, restored["data"].get_state(), meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
