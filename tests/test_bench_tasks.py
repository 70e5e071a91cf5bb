"""bench/bench_tasks.py end to end at toy size, in a subprocess as it is run (timings are never asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.slow
def test_task_bench_runs_both_sides_on_the_same_examples_and_writes_one_json_line(tmp_path):
  proc = subprocess.run([sys.executable, str(BENCH / "bench_tasks.py"), "--tasks", "arc_easy,winogrande",
                         "--n_eval", "4", "--hf_threads", "1", "--workdir", str(tmp_path), "--json",
                         str(tmp_path / "results.jsonl")], capture_output=True, text=True,
                        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert row["bench"] == "tasks" and row["examples"] == 8 and row["tasks"] == ["arc_easy", "winogrande"]
  for side in ("mimix", "lm_eval_hf"):
    assert row[side]["examples_per_sec"] > 0 and row[side]["peak_rss_mb"] > 100
  assert row["speedup"] == row["mimix"]["examples_per_sec"] / row["lm_eval_hf"]["examples_per_sec"]
  assert isinstance(row["same_accuracy"], bool) and row["lm_eval_hf"]["torch_threads"] == 1
