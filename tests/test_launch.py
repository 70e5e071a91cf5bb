"""The launch scripts as their users run them: --help and --dry_run, the datasets' download (resumable, training
splits only), the sbatch script from Slurm's spool with two tasks, and the whole gpt_large recipe rehearsed at
CPU size, killed during preprocessing and during training and run again."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimix_jax.training import config as config_lib

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "launch").rglob("*") if p.suffix in (".sh", ".sbatch") and p.name != "common.sh")
STAGES = ("pretrain", "pretrain_2048", "sft", "dpo")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_parses_and_has_help(script, tmp_path):
  subprocess.run(["bash", "-n", str(script)], check=True)
  out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, cwd=tmp_path)
  assert out.returncode == 0 and out.stdout.startswith("usage:")
  assert "huggingface-cli" not in script.read_text()  # gone from huggingface_hub 1.x; `hf` / snapshot_download


def test_gpt_large_recipe_dry_run_chains_the_stages_under_one_root(tmp_path):
  root = tmp_path / "recipe"
  out = subprocess.run(["bash", str(REPO / "launch/gpt_large/run_all.sh"), "--root", str(root), "--dry_run"],
                       capture_output=True, text=True, cwd=tmp_path, check=True).stdout
  commands = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
  assert len(commands) == 13 and not list(tmp_path.rglob("*.parquet"))  # printed, not run
  for stage in STAGES:
    cfg = config_lib.load(f"{REPO}/configs/gpt_large.py:{stage}")
    train = next(c for c in commands if f"configs/gpt_large.py:{stage} " in c)
    assert f"--workdir {root}/runs/{stage}" in train and f"--config.tokenizer_path={root}/data/tokenizer" in train
    data = train.split("--config.data.train_path=")[1].split()[0]
    assert any(f"--output {data}" in c for c in commands if "mimix_jax.preprocess" in c)
    if cfg.init_from:  # each stage starts from the previous stage's run, under the same root
      assert f"--config.init_from={root}/runs/{Path(cfg.init_from).name}" in train


def test_download_takes_training_splits_only_and_finishes_an_interrupted_one(tmp_path):
  mirror, raw = tmp_path / "mirror", tmp_path / "raw"
  subprocess.run([sys.executable, str(REPO / "launch/gpt_large/make_mirror.py"), "--output", str(mirror),
                  "--docs", "40"], check=True, capture_output=True)
  cmd = [sys.executable, "-m", "mimix_jax.download", "--sources", str(REPO / "launch/gpt_large/sources.json"),
         "--raw", str(raw), "--mirror", str(mirror)]
  assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
  ultrachat = sorted(p.name for p in (raw / "sft/ultrachat_200k/data").iterdir())
  assert ultrachat == ["train_sft-00000-of-00001.parquet"]  # not test_sft, train_gen, test_gen
  assert not (raw / "fineweb/data").exists() and sorted(p.name for p in (raw / "wikipedia").iterdir()) == [
      ".mimix_download_complete", "20231101.en"]
  # An interrupted download: a file cut short, the source not marked complete. Run again: it is finished.
  victim = raw / "fineweb/sample/100BT/001_00000.parquet"
  victim.write_bytes(victim.read_bytes()[:100])
  (raw / "fineweb/.mimix_download_complete").unlink()
  again = subprocess.run(cmd, capture_output=True, text=True)
  assert again.returncode == 0 and "fetched HuggingFaceFW/fineweb " in again.stdout
  assert again.stdout.count("have ") == 7
  assert victim.read_bytes() == (mirror / "datasets/HuggingFaceFW/fineweb/sample/100BT/001_00000.parquet").read_bytes()


FAKE_SRUN = """#!/usr/bin/env bash
# srun for one host: SLURM_NTASKS copies of the command with each task's ids (what Slurm gives a job step).
[ "$1" = "--kill-on-bad-exit=1" ] && shift
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_TASKS=$SLURM_NTASKS \\
    "$@" > "task$i.out" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def test_sbatch_script_from_slurms_spool_trains_with_two_tasks(tmp_path, pretrain_shards, tokenizer_dir):
  from test_train import SMALL_MODEL, env, losses_of
  spool, elsewhere, bin_dir = tmp_path / "spool/job4242", tmp_path / "elsewhere", tmp_path / "bin"
  for d in (spool, elsewhere, bin_dir):
    d.mkdir(parents=True)
  shutil.copyfile(REPO / "launch/train_slurm.sbatch", spool / "slurm_script")  # what sbatch runs
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  train_args = [f"{REPO}/configs/tiny.py:pretrain", f"--config.data.train_path={pretrain_shards}",
                f"--config.tokenizer_path={tokenizer_dir}", "--config.init_from=", "--config.max_len=64",
                "--config.batch_size=4", "--config.total_steps=4", "--config.log_every=1", *SMALL_MODEL]
  slurm = {"SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  out = subprocess.run(["bash", str(spool / "slurm_script"), *train_args, "--workdir", str(tmp_path / "multi")],
                       cwd=elsewhere, env={**env(1), **slurm}, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr + "".join(p.read_text()[-2000:] for p in elsewhere.glob("task*.out"))
  assert "process 0/2" in (elsewhere / "task0.out").read_text() and "process 1/2" in (elsewhere / "task1.out").read_text()
  single = tmp_path / "single"
  subprocess.run([sys.executable, "-m", "mimix_jax.train", "--config", *train_args, "--workdir", str(single)],
                 env=env(2), check=True, capture_output=True, timeout=600)
  assert losses_of(tmp_path / "multi").keys() == {1, 2, 3, 4}
  for step, loss in losses_of(single).items():
    assert losses_of(tmp_path / "multi")[step] == pytest.approx(loss, rel=1e-5)


# ------------------------------------------------------------------ the rehearsal

def rehearse(root: Path, **kw):
  return subprocess.Popen(["bash", str(REPO / "launch/gpt_large/run_all.sh"), "--rehearse", "--root", str(root)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                          env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **kw)


def kill_when(proc, ready, timeout=900):
  """SIGKILLs the whole chain (its process group) once `ready()` holds."""
  t0 = time.time()
  while not ready():
    assert proc.poll() is None, "the rehearsal ended before the moment to kill it"
    assert time.time() - t0 < timeout
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


def stage_losses(root: Path) -> dict:
  return {s: [json.loads(l)["loss"] for l in (root / f"runs/{s}/metrics.jsonl").read_text().splitlines()]
          for s in STAGES}


@pytest.mark.slow
def test_rehearsal_killed_in_preprocessing_and_in_training_finishes_with_the_same_losses(tmp_path):
  import torch
  import transformers
  reference = rehearse(tmp_path / "reference")
  log = reference.communicate(timeout=1800)[0]
  assert reference.returncode == 0, log[-3000:]
  root = tmp_path / "interrupted"
  proc = rehearse(root)  # killed while it preprocesses the 2048-token shards
  kill_when(proc, lambda: any(root.glob("data/.pretrain_2048.tmp-*")))
  assert not (root / "data/pretrain_2048/manifest.json").exists()
  proc = rehearse(root)  # killed in the middle of the SFT stage, after its first checkpoint
  kill_when(proc, lambda: (root / "runs/sft/checkpoints/4").is_dir())
  proc = rehearse(root)
  log = proc.communicate(timeout=1800)[0]
  assert proc.returncode == 0, log[-3000:]
  assert "have tokenizer" in log and "have pretrain_1024" in log and "resumed from" in log
  assert stage_losses(root) == stage_losses(tmp_path / "reference")
  hf = transformers.AutoModelForCausalLM.from_pretrained(root / "runs/export", dtype=torch.float32)
  assert hf.config.architectures == ["LlamaForCausalLM"]
  reply = log.split("=== one chat reply", 1)[1].split("\n", 2)[2].split("recipe complete in")[0]
  assert reply.strip()
