"""The benchmarks end to end at toy size, in subprocesses as they are run (timings are never asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def json_line_of(script: str, tmp_path: Path, *args: str) -> dict:
  """Runs bench/SCRIPT with --json and returns the one JSON line it wrote."""
  results = tmp_path / "results.jsonl"
  proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(results)], capture_output=True,
                        text=True, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = [json.loads(line) for line in results.read_text().splitlines()]
  return row


def test_train_step_bench_runs_both_sides_and_writes_one_json_line(tmp_path):
  row = json_line_of("train_throughput.py", tmp_path, "--shape", "cpu_smoke", "--steps", "2", "--rounds", "2")
  assert row["shape"] == "cpu_smoke" and row["loss_chunk"] == 16 and row["attention_q_block"] == 16
  assert row["tokens_per_sec"] > 0 and row["torch_tokens_per_sec"] > 0
  assert row["speedup_vs_torch"] == row["tokens_per_sec"] / row["torch_tokens_per_sec"]
  assert row["device"] == "1 x cpu" and "mfu" not in row  # no peak FLOP/s is claimed for a CPU


def test_decode_bench_prints_a_row_per_model_and_batch():
  proc = subprocess.run([sys.executable, str(BENCH / "bench_decode.py"), "--presets", "tiny", "--batches", "2",
                         "--new_tokens", "4", "--repeats", "1", "--hf_threads", "1"],
                        capture_output=True, text=True, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| tiny")]
  assert [r[1].strip() for r in rows] == ["2"]
  assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)  # decode tokens/s, ours and HF


def test_checkpoint_bench_saves_both_ways_and_writes_one_json_line(tmp_path):
  row = json_line_of("bench_checkpoint.py", tmp_path, "--shape", "cpu_smoke", "--saves", "1", "--window", "1")
  assert row["bench"] == "checkpoint" and row["window_steps"] == 1 and row["state_gib"] > 0
  # A blocking save returns only once the write is done; both calls took real time.
  assert row["sync_save_call_s"] > 0 and row["async_save_call_s"] > 0 and row["async_pending_after_window_s"] >= 0


def test_gpu_script_rehearses_at_toy_size_on_a_cpu(tmp_path):
  """bench/gpu.sh end to end at toy size, so that a lent GPU's few minutes are not spent finding a broken flag."""
  env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(tmp_path),
         "GPU_BENCH_SHAPE": "cpu_smoke", "GPU_BENCH_BATCHES": "4 2", "GPU_BENCH_PRESET": "tiny"}
  proc = subprocess.run(["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
  # cuDNN's kernel does not exist on a CPU: each batch of it fails (at once, not at the timeout) and the script
  # goes on; the XLA runs stop at the first batch that works.
  assert [(r["attention"], r["remat"], r["batch"]) for r in rows if r["bench"] == "train_step"] == [
      ("xla", "save_dots", 4), ("xla", "full", 4)]
  assert "batch 2 failed (cudnn, full)" in proc.stdout
  assert "| tiny | 8 |" in proc.stdout  # the decode table
  assert [r["shape"] for r in rows if r["bench"] == "checkpoint"] == ["cpu_smoke"]


@pytest.mark.slow
def test_muon_bench_sweeps_both_optimizers_and_writes_curves_runs_a_summary_and_a_plot(tmp_path):
  out = tmp_path / "muon"
  proc = subprocess.run([sys.executable, str(BENCH / "bench_muon.py"), "--out", str(out), "--steps", "4",
                         "--eval_every", "2", "--seq", "32", "--warmup", "1", "--adamw_lrs", "1e-3,3e-3",
                         "--muon_lrs", "0.02,0.05", "--eval_rows", "16", "--timing_steps", "2", "--timing_rounds", "1",
                         "--timing_batches", "4", "--tokenizer_chars", "300000", "--model",
                         json.dumps(dict(vocab_size=800, n_layers=2, d_model=64, d_ff=128, attention_q_block=16))],
                        capture_output=True, text=True, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  runs = [r for r in rows if r["kind"] == "run"]
  assert [(r["optimizer"], r["lr"] if r["optimizer"] == "adamw" else r["muon_lr"]) for r in runs] == [
      ("adamw", 1e-3), ("adamw", 3e-3), ("muon", 0.02), ("muon", 0.05)]
  for run in runs:
    curve = [r for r in rows if r["kind"] == "eval" and (r["optimizer"], r["lr"], r["muon_lr"]) == (
        run["optimizer"], run["lr"], run["muon_lr"])]
    assert [p["step"] for p in curve] == [0, 2, 4] and curve[-1]["eval_loss"] == run["final_eval_loss"]
  assert len({r["eval_loss"] for r in rows if r["kind"] == "eval" and r["step"] == 0}) == 1  # the same init
  (summary,) = [r for r in rows if r["kind"] == "summary"]
  best_adamw = min((r for r in runs if r["optimizer"] == "adamw"), key=lambda r: r["final_eval_loss"])
  assert summary["adamw_best_lr"] == best_adamw["lr"]
  assert all(r["lr"] == best_adamw["lr"] for r in runs if r["optimizer"] == "muon")  # Muon's AdamW part
  if summary["token_ratio"] is not None:
    assert summary["token_ratio"] == summary["muon_tokens_to_reach_adamw_final"] / summary["adamw_tokens"]
  assert summary["adamw_step_ms"] > 0 and summary["muon_step_ms"] > 0
  assert [(r["batch"], r["tokens_per_step"]) for r in rows if r["kind"] == "timing"] == [(8, 256), (4, 128)]
  assert (out / "muon_vs_adamw.png").read_bytes()[:4] == b"\x89PNG"


def test_collectives_are_counted_in_compiled_hlo():
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from bench.muon_collectives import count_collectives
  mesh = jax.make_mesh((jax.device_count(),), ("x",))
  x = jax.device_put(jnp.ones((jax.device_count() * 4, 8)), NamedSharding(mesh, P("x")))
  gathered = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
  summed = jax.jit(lambda a: a.sum(0), out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
  assert count_collectives(gathered)["all-gather"] == {"count": 1, "bytes": x.size * 4}
  assert count_collectives(summed)["all-reduce"]["count"] == 1 and count_collectives(summed)["all-gather"]["count"] == 0
