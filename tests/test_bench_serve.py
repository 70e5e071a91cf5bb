"""bench/bench_serve.py end to end at toy size, in a subprocess as it is run (timings are never asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.slow
def test_serve_bench_times_every_level_both_ways_and_transformers_and_writes_one_json_line(tmp_path):
  proc = subprocess.run([sys.executable, str(BENCH / "bench_serve.py"), "--presets", "tiny", "--concurrency", "1",
                         "2", "--max_tokens", "4", "--context", "64", "--json", str(tmp_path / "results.jsonl")],
                        capture_output=True, text=True,
                        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert row["bench"] == "serve" and row["preset"] == "tiny" and sorted(row["serve"]) == ["1", "2"]
  for level in row["serve"].values():
    for way in ("concurrent", "sequential"):
      assert level[way]["tok_s"] > 0 and level[way]["ttft_ms"] > 0
    assert level["speedup"] == round(level["concurrent"]["tok_s"] / level["sequential"]["tok_s"], 2)
  assert row["hf"]["sequential_tok_s"] > 0 and row["hf"]["batch_tok_s"] > 0 and row["hf"]["threads"] in (1, 2)
