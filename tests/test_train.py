"""The train command end to end, as real subprocesses on real shards: exact resume after SIGKILL, clean exit on
SIGTERM, stage hand-over with init_from, and two JAX processes training together."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CORPUS_TRAIN, run_preprocess

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = ["--config.model.vocab_size=2000", "--config.model.n_layers=2", "--config.model.d_model=64",
               "--config.model.n_heads=4", "--config.model.n_kv_heads=2", "--config.model.d_ff=128"]


def train_cmd(run_dir, shards, tokenizer_dir, *extra, max_len=64, steps=12):
  return [sys.executable, "-m", "mimix_jax.train", "--config", f"{REPO}/configs/tiny.py:pretrain",
          "--workdir", str(run_dir),
          f"--config.data.train_path={shards}", f"--config.tokenizer_path={tokenizer_dir}", "--config.init_from=",
          f"--config.max_len={max_len}", "--config.batch_size=4", f"--config.total_steps={steps}",
          "--config.log_every=1", "--config.save_every_steps=3", "--config.optimizer.warmup_steps=2", *SMALL_MODEL,
          *extra]


def env(devices=1):
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": str(REPO)}


def losses_of(run_dir):
  return {r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def wait_for_steps(proc, run_dir, n, timeout=240):
  t0 = time.time()
  while time.time() - t0 < timeout:
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists() and len(path.read_text().splitlines()) >= n:
      return
    assert proc.poll() is None, f"training exited early with {proc.returncode}"
    time.sleep(0.2)
  raise TimeoutError(f"no step {n} after {timeout}s")


def test_kill_and_resume_gives_exactly_the_losses_of_an_uninterrupted_run(tmp_path, pretrain_shards, tokenizer_dir):
  reference = tmp_path / "reference"
  # Fetching each batch when needed; the interrupted run below sends 2 ahead (the default): same losses.
  subprocess.run(train_cmd(reference, pretrain_shards, tokenizer_dir, "--config.data.prefetch=0"), check=True,
                 cwd=REPO, env=env(), capture_output=True)
  expected = losses_of(reference)
  assert sorted(expected) == list(range(1, 13))

  run = tmp_path / "interrupted"
  cmd = train_cmd(run, pretrain_shards, tokenizer_dir)
  # 1) SIGTERM: saves the current step and exits cleanly.
  proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  wait_for_steps(proc, run, 4)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err.decode()[-2000:]
  saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] >= 4 and saved[-1] < 12
  # 2) SIGKILL at an arbitrary later moment: nothing is saved on the way out.
  proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for_steps(proc, run, saved[-1] + 3)
  proc.kill()
  proc.wait()
  # 3) The same command again finishes the run.
  subprocess.run(cmd, check=True, cwd=REPO, env=env(), capture_output=True)
  assert losses_of(run) == expected  # bitwise: same data order, same state


def test_init_from_hands_params_from_a_short_context_run_to_a_longer_one(tmp_path, pretrain_shards, tokenizer_dir):
  stage1 = tmp_path / "pretrain"
  subprocess.run(train_cmd(stage1, pretrain_shards, tokenizer_dir, steps=30, max_len=64), check=True, cwd=REPO,
                 env=env(), capture_output=True)
  long_shards = tmp_path / "shards_128"
  assert run_preprocess(tokenizer_dir, long_shards, "pretrain", [CORPUS_TRAIN / "shakespeare_macbeth.txt.gz"], 128) == 0
  fresh, handed = tmp_path / "fresh", tmp_path / "pretrain_2048"
  subprocess.run(train_cmd(fresh, long_shards, tokenizer_dir, max_len=128, steps=1), check=True, cwd=REPO,
                 env=env(), capture_output=True)
  # Relative run and init_from paths, as `make demo` and users pass them (Orbax itself wants absolute ones).
  out = subprocess.run(train_cmd(handed.name, long_shards, tokenizer_dir, f"--config.init_from={stage1.name}",
                                 max_len=128, steps=1), check=True, cwd=tmp_path, env=env(), capture_output=True,
                       text=True)
  assert "initialised params from" in out.stdout
  # The hand-over kept what stage 1 learnt: its first loss at the new length is far below a fresh model's.
  assert losses_of(handed)[1] < losses_of(fresh)[1] - 1.0
  assert json.loads((handed / "model.json").read_text())["model"]["max_len"] == 128
  assert (handed / "tokenizer" / "tokenizer.model").exists()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_together_like_one(tmp_path, pretrain_shards, tokenizer_dir):
  single = tmp_path / "single"
  subprocess.run(train_cmd(single, pretrain_shards, tokenizer_dir, steps=4), check=True, cwd=REPO, env=env(2),
                 capture_output=True)
  port = _free_port()
  run = tmp_path / "multi"
  procs = [subprocess.Popen(train_cmd(run, pretrain_shards, tokenizer_dir, f"--coordinator_address=127.0.0.1:{port}",
                                      "--num_processes=2", f"--process_id={i}", steps=4),
                            cwd=REPO, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err.decode()[-3000:]
  assert "process 0/2" in outs[0][0].decode() and "process 1/2" in outs[1][0].decode()
  single_losses, multi_losses = losses_of(single), losses_of(run)
  assert sorted(multi_losses) == [1, 2, 3, 4]
  for step in single_losses:
    assert multi_losses[step] == pytest.approx(single_losses[step], rel=1e-5)
