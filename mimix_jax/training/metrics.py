"""What a user watches: a console progress bar, metrics.jsonl, TensorBoard events and a loss-curve PNG.

Only process 0 writes. MFU uses ModelConfig.flops_per_token (PaLM convention: 6N + 12 L T d_attn, causal
attention not halved) over the dense bf16 peak of the device kind.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax

from mimix_jax import io_utils

CORE = "tasks/core"  # the eval.jsonl key of the benchmark aggregate (training/loop.py)

# Dense (not sparse) bf16 peak TFLOP/s per device, by jax `device_kind` substring.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A800": 312.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_TFLOPS.items():
    if name in kind:
      return tflops * 1e12
  return None  # CPU and unknown accelerators: MFU is not reported


class MetricsLogger:
  def __init__(self, run_dir: Path, total_steps: int, start_step: int, flops_per_token: float,
               tokens_per_step: int, enabled: bool = True):
    self.run_dir, self.total_steps, self.enabled = run_dir, total_steps, enabled
    self.flops_per_token, self.tokens_per_step = flops_per_token, tokens_per_step
    self.peak = peak_flops_per_device()
    self.n_devices = jax.device_count()
    self.last_time, self.last_step = time.perf_counter(), start_step
    self.history: list[tuple[int, float]] = []
    self.core_history: list[tuple[int, float]] = []  # benchmark CORE (eval_tasks), drawn with the loss
    self.bar = self.tb = None
    if enabled:
      for name in ("metrics.jsonl", "eval.jsonl"):  # what was logged after the checkpoint is logged again
        _truncate_after(run_dir / name, start_step)
      self.history = [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl")]
      self.core_history = [(r["step"], r[CORE]) for r in read_jsonl(run_dir / "eval.jsonl") if CORE in r]
      from tensorboardX import SummaryWriter
      from tqdm import tqdm
      self.tb = SummaryWriter(str(run_dir / "tensorboard"))
      self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

  def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Logs the metrics of `step` (1-based, after the update); speed is measured since the previous log."""
    now = time.perf_counter()
    steps = max(step - self.last_step, 1)
    dt = (now - self.last_time) / steps
    self.last_time, self.last_step = now, step
    tokens_per_sec = self.tokens_per_step / dt
    record = {"step": step, **{k: _py(v) for k, v in metrics.items()}, "step_time": dt,
              "tokens_per_sec": tokens_per_sec, "tokens_per_sec_per_device": tokens_per_sec / self.n_devices,
              "eta_sec": dt * (self.total_steps - step)}
    if self.peak:
      record["mfu"] = self.flops_per_token * tokens_per_sec / (self.peak * self.n_devices)
    if not self.enabled:
      return record
    with open(self.run_dir / "metrics.jsonl", "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if isinstance(v, (int, float)) and math.isfinite(v) and k != "step":
        self.tb.add_scalar(k, v, step)
    self.history.append((step, record["loss"]))
    self.bar.update(step - self.bar.n)
    self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", gnorm=f"{record['grad_norm']:.2f}",
                         tok_s=f"{tokens_per_sec:,.0f}", **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
    return record

  def log_eval(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.run_dir / "eval.jsonl", "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    for k, v in metrics.items():
      self.tb.add_scalar(f"eval/{k}", v, step)
    if CORE in metrics:
      self.core_history.append((step, metrics[CORE]))
    self.bar.write(f"step {step}: " + " ".join(f"eval_{k}={v:.4f}" for k, v in metrics.items()))

  def write(self, message: str) -> None:
    if self.enabled:
      self.bar.write(message)

  def plot(self) -> None:
    """Refreshes RUN_DIR/loss.png (called at each checkpoint); a picture that cannot be written is only a warning."""
    if not self.enabled or not self.history:
      return
    try:
      self._plot()
    except OSError as e:
      self.write(f"warning: could not write {self.run_dir / 'loss.png'} ({e})")

  def _plot(self) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, values = zip(*self.history)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.plot(steps, values, color="tab:red", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(self.run_dir.name)
    ax.grid(alpha=0.3)
    if self.core_history:
      right = ax.twinx()
      right.plot(*zip(*self.core_history), color="tab:blue", marker="o", linewidth=1)
      right.set_ylabel("benchmark CORE (eval_tasks)", color="tab:blue")
    fig.tight_layout()
    with io_utils.atomic_file(self.run_dir / "loss.png") as tmp:
      fig.savefig(tmp)
    plt.close(fig)

  def close(self) -> None:
    if self.enabled:
      self.plot()
      try:
        self.tb.close()
      except OSError:  # a full disk: metrics.jsonl, written first, already reported it
        pass
      self.bar.close()


def _py(v: Any) -> Any:
  try:
    return v.item()
  except AttributeError:
    return v


def read_jsonl(path: Path) -> list[dict]:
  """The records of a JSON-lines file (metrics.jsonl, eval.jsonl); [] if it does not exist."""
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
  """On resume, drop records logged after the checkpoint we restart from: they will be logged again."""
  if path.exists():
    io_utils.write_text(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r["step"] <= step))
