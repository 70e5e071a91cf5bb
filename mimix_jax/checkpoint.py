"""Run directories and Orbax checkpoints.

A run directory is self-describing: every later command (train resume, init_from, generate, chat, evaluate,
export) needs only its path.

    RUN_DIR/
      config.json            the resolved training config
      model.json             {"model": ModelConfig fields, "generation": {...}}: what inference needs
      tokenizer/             a copy of the tokenizer directory the run trained with
      manifest.json          versions, command line, data manifests
      metrics.jsonl, loss.png, tensorboard/
      checkpoints/<step>/    Orbax items: params, opt_state, meta (step, rng, counters), data (grain state)

Params are saved as a plain nested dict ({"embed": [V, d], "layers": {"wq": [L, d, H, D], ...},
"final_norm": [d]}) so that tools can read them without the optimizer state and onto any mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mimix_jax import model as model_lib
from mimix_jax.model_config import ModelConfig

CHECKPOINTS = "checkpoints"
DEFAULT_GENERATION = dict(mode="raw", temperature=0.95, top_p=0.95, top_k=0, max_new_tokens=256, system_message=None)


@dataclasses.dataclass
class RunInfo:
  run_dir: Path
  step_dir: Path | None  # the checkpoint step directory that was resolved, if any
  model: ModelConfig
  generation: dict[str, Any]  # mode ("raw" | "chat"), stop_ids, sampling defaults, system_message
  tokenizer_dir: Path


def write_json_atomic(path: Path | str, obj: Any) -> None:
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def write_run_info(run_dir: Path | str, model_cfg: ModelConfig, tokenizer_dir: Path | str | None,
                   generation: dict[str, Any]) -> None:
  """Writes model.json and copies the tokenizer into the run dir (once)."""
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  if tokenizer_dir:
    src, dst = Path(tokenizer_dir), run_dir / "tokenizer"
    if src.resolve() != dst.resolve():
      tmp = run_dir / ".tokenizer.tmp"
      shutil.rmtree(tmp, ignore_errors=True)
      shutil.copytree(src, tmp)
      shutil.rmtree(dst, ignore_errors=True)
      os.replace(tmp, dst)
  write_json_atomic(run_dir / "model.json", {"model": model_cfg.to_dict(), "generation": generation})


def resolve(path: Path | str) -> tuple[Path, Path]:
  """A run dir (-> its latest checkpoint) or a step dir (RUN/checkpoints/STEP) -> absolute (run_dir, step_dir)."""
  path = Path(path).absolute()  # Orbax refuses relative paths
  if (path / "model.json").exists():
    step = latest_step(path)
    if step is None:
      raise FileNotFoundError(f"{path}: run directory has no complete checkpoint under {CHECKPOINTS}/")
    return path, path / CHECKPOINTS / str(step)
  if path.parent.name == CHECKPOINTS and (path.parent.parent / "model.json").exists():
    if not (path / "params").exists():
      raise FileNotFoundError(f"{path}: not a complete checkpoint (no params)")
    return path.parent.parent, path
  raise FileNotFoundError(f"{path}: neither a run directory (with model.json) nor RUN_DIR/{CHECKPOINTS}/STEP")


def latest_step(run_dir: Path | str) -> int | None:
  ckpt_dir = Path(run_dir) / CHECKPOINTS
  if not ckpt_dir.exists():
    return None
  steps = ocp.utils.checkpoint_steps(ckpt_dir)  # only finalized (complete) checkpoints
  return max(steps) if steps else None


def read_run_info(path: Path | str) -> RunInfo:
  run_dir, step_dir = resolve(path)
  meta = json.loads((run_dir / "model.json").read_text())
  generation = {**DEFAULT_GENERATION, **meta.get("generation", {})}
  return RunInfo(run_dir, step_dir, ModelConfig.from_dict(meta["model"]), generation, run_dir / "tokenizer")


def abstract_params(model_cfg: ModelConfig, shardings=None) -> dict:
  """ShapeDtypeStructs of the params pure dict, with target shardings (None: the default device)."""
  abstract = nnx.to_pure_dict(nnx.state(model_lib.abstract(model_cfg), nnx.Param))
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


def params_to_model(model_cfg: ModelConfig, params: dict) -> model_lib.Transformer:
  graphdef, _ = nnx.split(model_lib.abstract(model_cfg))
  return nnx.merge(graphdef, params)


def model_params(model: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_model(path: Path | str, *, dtype: str | None = None, shardings=None) -> tuple[model_lib.Transformer, RunInfo]:
  """The model of a run (latest or given step) for inference, with its RunInfo."""
  info = read_run_info(path)
  model_cfg = info.model if dtype is None else dataclasses.replace(info.model, dtype=dtype)
  return params_to_model(model_cfg, load_params(path, model_cfg, shardings)), info


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
