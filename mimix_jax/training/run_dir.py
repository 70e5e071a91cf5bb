"""Run directories: self-describing, so every later command (train resume, init_from, generate, chat, evaluate,
export) needs only the path.

    RUN_DIR/
      config.json            the resolved training config
      model.json             {"model": ModelConfig fields, "generation": {...}}: what inference needs
      tokenizer/             a copy of the tokenizer directory the run trained with
      manifest.json          versions, command line, data manifests
      metrics.jsonl, eval.jsonl, loss.png, tensorboard/
      checkpoints/<step>/    Orbax items (training/checkpoints.py)

A command's --checkpoint takes a run directory (its latest complete checkpoint) or one step, RUN/checkpoints/STEP.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from mimix_jax import io_utils
from mimix_jax.model.config import ModelConfig

CHECKPOINTS = "checkpoints"
DEFAULT_GENERATION = dict(mode="raw", temperature=0.95, top_p=0.95, top_k=0, max_new_tokens=256, system_message=None)


@dataclasses.dataclass
class RunInfo:
  run_dir: Path
  step_dir: Path | None  # the checkpoint step directory that was resolved, if any
  model: ModelConfig
  generation: dict[str, Any]  # mode ("raw" | "chat"), stop_ids, sampling defaults, system_message
  tokenizer_dir: Path


def write_run_info(run_dir: Path | str, model_cfg: ModelConfig, tokenizer_dir: Path | str | None,
                   generation: dict[str, Any]) -> None:
  """Writes model.json and copies the tokenizer into the run dir (replacing an older copy only once complete)."""
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  if tokenizer_dir:
    src, dst = Path(tokenizer_dir), run_dir / "tokenizer"
    if src.resolve() != dst.resolve():
      tmp = run_dir / f".tokenizer.tmp-{os.getpid()}"
      shutil.rmtree(tmp, ignore_errors=True)
      shutil.copytree(src, tmp)
      io_utils.replace_dir(tmp, dst)
  io_utils.write_json(run_dir / "model.json", {"model": model_cfg.to_dict(), "generation": generation},
                      sort_keys=True)


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


class RunInUse(RuntimeError):
  """Another live process holds the run directory."""


class RunLock:
  """An exclusive lock on a run directory for the life of the process (with-block).

  flock on RUN_DIR/.lock: the OS releases it when the holder exits, crashes or is killed (-9 included), so a
  stale lock never blocks a re-run, and a second train process on the same run is refused instead of racing
  the first one's checkpoints. The file names the holder for the refusal message.
  """

  def __init__(self, run_dir: Path | str):
    self.path = Path(run_dir) / ".lock"
    self.fd: int | None = None

  def __enter__(self) -> "RunLock":
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(self.fd, 4096).decode(errors="replace").strip() or "another process"
      os.close(self.fd)
      raise RunInUse(f"{self.path.parent} is in use by {holder}: wait for it to finish, or train into another "
                     "--workdir") from None
    except OSError as e:  # a file system without locks: train unprotected rather than not at all
      print(f"warning: cannot lock {self.path} ({e}); make sure no other process trains into this run", flush=True)
    os.ftruncate(self.fd, 0)
    os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n"
             .encode())
    return self

  def __exit__(self, *exc) -> None:
    if self.fd is not None:
      os.close(self.fd)  # releases the lock
      self.fd = None
