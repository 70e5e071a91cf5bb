"""`make demo` end to end at reduced size: every stage runs and its outputs make sense."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def records(path):
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_demo_pipeline_runs_every_stage(tmp_path):
  out = tmp_path / "demo"
  # A relative workdir, as `make demo` passes it (every stage must cope with relative paths).
  workdir = os.path.relpath(out, REPO)
  proc = subprocess.run([sys.executable, "-m", "mimix_jax.demo", "--workdir", workdir, "--scale", "0.5"],
                        cwd=REPO, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  runs = out / "runs"

  pretrain = records(runs / "pretrain/metrics.jsonl")
  assert pretrain[-1]["loss"] < pretrain[0]["loss"] - 1.0
  assert (runs / "pretrain/loss.png").stat().st_size > 1000
  assert json.loads((runs / "pretrain_2048/model.json").read_text())["model"]["max_len"] == 256
  sft = records(runs / "sft/metrics.jsonl")
  assert sft[-1]["loss"] < sft[0]["loss"]
  assert json.loads((runs / "sft/model.json").read_text())["generation"]["mode"] == "chat"

  held_out = records(runs / "dpo/eval.jsonl")[-1]
  assert held_out["rewards/accuracies"] > 0.5
  assert held_out["rewards/margins"] > 0

  ppl = json.loads((out / "ppl.json").read_text())
  assert math.isfinite(ppl["ppl"]) and ppl["ppl"] < math.exp(pretrain[0]["loss"])
  assert (out / "export/config.json").exists() and (out / "export/model.safetensors").exists()
  assert "export" in proc.stdout and "verif" in proc.stdout.lower()
  reply = proc.stdout.split("chat reply to 'What is AI?':", 1)[1].splitlines()[0].strip()
  assert reply
  tasks = json.loads((out / "tasks.json").read_text())
  assert len(tasks["tasks"]) == 8 and all(r["n"] > 0 for r in tasks["tasks"].values())
  table = proc.stdout.split("benchmark tasks (", 1)[1]
  assert all(f"  {name} " in table for name in tasks["tasks"]) and f"CORE            {tasks['core']:.3f}" in table

  # A second run reuses every finished stage.
  again = subprocess.run([sys.executable, "-m", "mimix_jax.demo", "--workdir", workdir, "--scale", "0.5"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0
  assert "=== tokenizer" not in again.stdout and "=== prep" not in again.stdout
