"""Orbax checkpoints of a run: the whole train state with the data iterator's position (TrainCheckpointer), and
params-only reads and writes for the other commands.

    RUN_DIR/checkpoints/<step>/   params, opt_state, meta (step, counters), data (Grain iterator state per process),
                                  mimix_checksums.json (sha256 of every file, written once the save is complete)

Params are saved as a plain nested dict ({"embed": [V, d], "layers": {"wq": [L, d, H, D], ...},
"final_norm": [d]}) so that tools can read them without the optimizer state and onto any mesh.

A checkpoint whose files are missing, truncated or altered (against its checksums), or that Orbax cannot read,
is damaged: resuming moves it aside (STEP.damaged) and uses the newest good one; the other commands, given a run
directory, use the newest good one too, and refuse a damaged step that was named explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from mimix_jax import io_utils
from mimix_jax.model import transformer
from mimix_jax.model.config import ModelConfig
from mimix_jax.training.run_dir import CHECKPOINTS, RunInfo, read_run_info

CHECKSUMS = "mimix_checksums.json"


class DamagedCheckpoint(ValueError):
  """A checkpoint that cannot be trusted; the message names it and what is wrong."""


def write_checksums(step_dir: Path) -> None:
  """sha256 of the items' files (params/, opt_state/, ...); Orbax's own top-level files change at the commit."""
  files = sorted(p for p in step_dir.glob("*/**/*") if p.is_file())
  io_utils.write_json(step_dir / CHECKSUMS, {str(p.relative_to(step_dir)): io_utils.sha256_file(p) for p in files})


def damage(step_dir: Path, items: Sequence[str] | None = None) -> str | None:
  """What is wrong with the checkpoint's files (of `items`, default all) against its checksums, or None.

  A checkpoint without checksums (saved before they existed, or killed before they were written) is not
  judged here; reading it is the remaining test.
  """
  sums_file = step_dir / CHECKSUMS
  if not sums_file.is_file():
    return None
  for rel, digest in json.loads(sums_file.read_text()).items():
    if items is not None and rel.split("/")[0] not in items:
      continue
    if not (step_dir / rel).is_file():
      return f"{rel} is missing"
    if io_utils.sha256_file(step_dir / rel) != digest:
      return f"{rel} does not match its checksum (truncated or altered)"
  return None


def open_checkpoint(path: Path | str) -> RunInfo:
  """RunInfo of a run dir's newest undamaged checkpoint (saying which it skipped), or of a step dir, which must
  be undamaged. Only the params are checked: that is what every reader of a run uses."""
  info = read_run_info(path)
  explicit = Path(path).absolute() == info.step_dir
  steps = [info.step_dir] if explicit else sorted(
      (d for d in (info.run_dir / CHECKPOINTS).iterdir() if d.name.isdigit() and (d / "params").is_dir()),
      key=lambda d: int(d.name), reverse=True)
  for step_dir in steps:
    problem = damage(step_dir, items=("params",))
    if problem is None:
      return dataclasses.replace(info, step_dir=step_dir)
    if explicit:
      raise DamagedCheckpoint(f"{step_dir}: damaged checkpoint ({problem}); use another step of the run")
    print(f"warning: {step_dir} is damaged ({problem}); using the checkpoint before it", file=sys.stderr)
  raise DamagedCheckpoint(f"{info.run_dir}: every checkpoint is damaged; nothing can be loaded")


def check_finite(params: dict, where: Path | str) -> None:
  """Refuses weights holding NaN or inf (a diverged run's), naming the first such parameter."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, value in flat:
    if not bool(np.isfinite(np.asarray(jax.device_get(value), np.float32)).all()):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise DamagedCheckpoint(f"{where}: the weights hold NaN or inf (in {name}); use an earlier checkpoint")


def abstract_params(model_cfg: ModelConfig, shardings=None) -> dict:
  """ShapeDtypeStructs of the params pure dict, with target shardings (None: the default device)."""
  abstract = transformer.abstract_params(model_cfg)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def load_params(path: Path | str | RunInfo, model_cfg: ModelConfig | None = None, shardings=None) -> dict:
  """Params (pure dict) of a run dir or step dir (open_checkpoint), or of an opened RunInfo, restored onto
  `shardings` (any mesh) without the optimizer."""
  info = path if isinstance(path, RunInfo) else open_checkpoint(path)
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
  """Orbax CheckpointManager for the whole train state + the data iterator state, saved asynchronously.

  The state's scalars (step, non-finite counters) travel in `meta`; checksums are written by process 0 once a
  save is complete; a save that fails in the background surfaces at the next `check()`.
  """

  ARRAYS = ("params", "opt_state")  # the other entries of a train state are int32 scalars, kept in meta

  def __init__(self, run_dir: Path | str, keep: int, keep_every: int = 0):
    import grain.checkpoint as grain_ckpt
    self._grain = grain_ckpt
    self.directory = Path(run_dir).absolute() / CHECKPOINTS
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every or None, enable_async_checkpointing=True, create=True,
        cleanup_tmp_directories=True,  # a killed run's half-written step
        async_options=ocp.AsyncOptions(post_finalization_callback=self._after_save))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def _after_save(self) -> None:
    """Orbax calls this when a save's files are complete, just before it renames its temporary directory into
    place: the checksums go in with them, so the rename commits both."""
    if jax.process_index() != 0:
      return
    for step_dir in self.directory.glob("*.orbax-checkpoint-tmp*"):
      if step_dir.is_dir() and not (step_dir / CHECKSUMS).exists():
        write_checksums(step_dir)

  def save(self, step: int, state: dict, data_state: bytes, force: bool = False) -> None:
    meta = {k: int(jax.device_get(v)) for k, v in state.items() if k not in self.ARRAYS}
    self.manager.save(step, force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        data=self._grain.CheckpointSave(_DataState(data_state))))

  def check(self) -> None:
    """Raises the error of a background save that failed (Orbax keeps it until asked)."""
    self.manager.check_for_errors()

  def restore_latest(self, abstract_state: dict, shardings: dict) -> tuple[int, dict, bytes] | None:
    """(step, state, data iterator state) of the newest good checkpoint, onto any mesh; None if there is none.

    Damaged newer ones are reported, one line each, and moved aside once a good one is found.
    """
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem = damage(self.directory / str(step))
      if problem is None:
        try:
          state, data_state = self._restore(step, abstract_state, shardings)
        except Exception as e:  # noqa: BLE001 (whatever Orbax / tensorstore raise on unreadable files)
          problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        else:
          self._quarantine(damaged)
          return step, state, data_state
      print(f"checkpoint {self.directory / str(step)} is damaged ({problem}); trying the one before", flush=True)
      damaged.append(step)
    if damaged:
      raise DamagedCheckpoint(f"{self.directory}: no undamaged checkpoint (steps {damaged}); delete them to "
                              "start the run over")
    return None

  def _restore(self, step: int, abstract_state: dict, shardings: dict) -> tuple[dict, bytes]:
    arrays = {k: abstract_state[k] for k in self.ARRAYS}
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), arrays,
                          {k: shardings[k] for k in arrays})
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target["params"]),
        opt_state=ocp.args.StandardRestore(target["opt_state"]),
        meta=ocp.args.JsonRestore(),
        data=self._grain.CheckpointRestore(_DataState())))
    meta = restored["meta"]
    meta.setdefault("nonfinite", meta.get("nonfinite_run", 0))  # the name before the counters moved on device
    scalars = {k: jax.device_put(jax.numpy.asarray(meta.get(k, 0), jax.numpy.int32), shardings[k])
               for k in abstract_state if k not in self.ARRAYS}
    return {"params": restored["params"], "opt_state": restored["opt_state"], **scalars}, restored["data"].get_state()

  def _quarantine(self, steps: list[int]) -> None:
    """Renames damaged steps to STEP.damaged (Orbax no longer sees them; new saves may reuse the number)."""
    if not steps:
      return
    from jax.experimental import multihost_utils
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mimix_quarantine_start")
    if jax.process_index() == 0:
      for step in steps:
        src = self.directory / str(step)
        src.rename(src.with_name(f"{step}.damaged"))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mimix_quarantine_end")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
