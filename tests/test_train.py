"""The train command end to end, as real subprocesses on real shards: exact resume after SIGKILL, clean exit on
SIGTERM, stage hand-over with init_from, and two JAX processes training together."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CORPUS_TRAIN, run_preprocess
from mimix_jax.training.loop import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_SAVE_FAILED

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


# Muon's case also scans its layers (tiny unrolls them) and decays on the wsd schedule.
MUON = ("--config.optimizer.name=muon", "--config.model.scan_layers=true", "--config.optimizer.schedule=wsd")


@pytest.mark.parametrize("optimizer", [(), MUON], ids=["adamw", "muon"])
def test_kill_and_resume_gives_exactly_the_losses_of_an_uninterrupted_run(tmp_path, pretrain_shards, tokenizer_dir,
                                                                           optimizer):
  reference = tmp_path / "reference"
  # Fetching each batch when needed; the interrupted run below sends 2 ahead (the default): same losses.
  subprocess.run(train_cmd(reference, pretrain_shards, tokenizer_dir, "--config.data.prefetch=0", *optimizer),
                 check=True, cwd=REPO, env=env(), capture_output=True)
  expected = losses_of(reference)
  assert sorted(expected) == list(range(1, 13))

  run = tmp_path / "interrupted"
  cmd = train_cmd(run, pretrain_shards, tokenizer_dir, *optimizer)
  # 1) SIGTERM: saves the current step and exits with the "interrupted, resumable" code, not 0.
  proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  wait_for_steps(proc, run, 4)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == EXIT_INTERRUPTED, err.decode()[-2000:]
  assert err.decode().strip().splitlines()[-1].startswith("train: error: signal received: saved step")
  assert b'"run_dir"' not in out  # the final line of a finished run
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


def test_a_wsd_run_kept_in_its_stable_stage_extends_into_exactly_the_longer_run(tmp_path, pretrain_shards,
                                                                                tokenizer_dir):
  wsd = ("--config.optimizer.schedule=wsd", "--config.optimizer.name=muon")
  planned = tmp_path / "planned"
  subprocess.run(train_cmd(planned, pretrain_shards, tokenizer_dir, *wsd, "--config.optimizer.decay_fraction=0.25"),
                 check=True, cwd=REPO, env=env(), capture_output=True)
  # 6 steps with no decay yet, then the same run resumed to 12 steps with the decay: the planned run, bitwise.
  run = tmp_path / "extended"
  subprocess.run(train_cmd(run, pretrain_shards, tokenizer_dir, *wsd, "--config.optimizer.decay_fraction=0",
                           steps=6), check=True, cwd=REPO, env=env(), capture_output=True)
  subprocess.run(train_cmd(run, pretrain_shards, tokenizer_dir, *wsd, "--config.optimizer.decay_fraction=0.25"),
                 check=True, cwd=REPO, env=env(), capture_output=True)
  assert losses_of(run) == losses_of(planned) and sorted(losses_of(run)) == list(range(1, 13))


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


# ------------------------------------------------------------------ nothing loses a run

def run_train(cmd, **kw):
  return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, **kw)


def last_line(text: str) -> str:
  return text.strip().splitlines()[-1]


def test_a_second_train_process_on_a_run_is_refused_naming_the_first(tmp_path, pretrain_shards, tokenizer_dir):
  run = tmp_path / "run"
  cmd = train_cmd(run, pretrain_shards, tokenizer_dir, steps=40)
  first = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for_steps(first, run, 2)
  second = run_train(cmd)
  assert second.returncode == 2
  line = last_line(second.stderr)
  assert line.startswith(f"train: error: {run} is in use by pid {first.pid} on {socket.gethostname()} (since ")
  assert line.endswith("wait for it to finish, or train into another --workdir") and second.stderr.count("\n") == 1
  first.kill()  # a SIGKILLed holder's lock goes with it
  first.wait()
  again = run_train(cmd)
  assert again.returncode == 0, again.stderr[-2000:]
  assert sorted(losses_of(run)) == list(range(1, 41))


def _a_params_file(step_dir: Path) -> Path:
  return max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_damaged_checkpoints_are_reported_and_the_newest_good_one_resumes_bitwise(tmp_path, pretrain_shards,
                                                                                   tokenizer_dir):
  run = tmp_path / "run"
  cmd = train_cmd(run, pretrain_shards, tokenizer_dir, "--config.keep_checkpoints=5")
  assert run_train(cmd).returncode == 0
  expected = losses_of(run)
  assert json.loads((run / "checkpoints" / "12" / "mimix_checksums.json").read_text())
  # 1) A truncated file: caught by the checksums.
  victim = _a_params_file(run / "checkpoints" / "12")
  victim.write_bytes(victim.read_bytes()[:-7])
  out = run_train(cmd)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"checkpoint {run}/checkpoints/12 is damaged (params/" in out.stdout and "resumed from" in out.stdout
  assert (run / "checkpoints" / "12.damaged").is_dir() and losses_of(run) == expected
  # 2) No checksums and a truncated file: Orbax cannot read it, and the same happens.
  (run / "checkpoints" / "12" / "mimix_checksums.json").unlink()
  victim = _a_params_file(run / "checkpoints" / "12")
  victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
  shutil.rmtree(run / "checkpoints" / "12.damaged")
  out = run_train(cmd)
  assert out.returncode == 0 and "checkpoints/12 is damaged (" in out.stdout and losses_of(run) == expected
  # 3) Flipped bytes in the params: the other commands use the newest good step, refuse a damaged one named.
  victim = _a_params_file(run / "checkpoints" / "12")
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0xFF
  victim.write_bytes(bytes(data))
  gen = subprocess.run([sys.executable, "-m", "mimix_jax.generate", "--checkpoint", str(run), "--prompt", "The",
                        "--max_new_tokens", "2", "--raw"], cwd=REPO, env=env(), capture_output=True, text=True)
  assert gen.returncode == 0 and f"{run}/checkpoints/12 is damaged" in gen.stderr and "using the checkpoint before" in gen.stderr
  gen = subprocess.run([sys.executable, "-m", "mimix_jax.generate", "--checkpoint", str(run / "checkpoints" / "12"),
                        "--prompt", "The"], cwd=REPO, env=env(), capture_output=True, text=True)
  assert gen.returncode == 2 and gen.stderr.count("\n") == 1 and "damaged checkpoint" in gen.stderr


def test_nonfinite_steps_halt_the_run_and_only_finite_states_are_checkpointed(tmp_path, pretrain_shards,
                                                                              tokenizer_dir):
  run = tmp_path / "run"
  # A learning rate no model survives: the gradients turn non-finite after a couple of updates.
  out = run_train(train_cmd(run, pretrain_shards, tokenizer_dir, "--config.optimizer.lr=1e6",
                            "--config.optimizer.warmup_steps=0", "--config.optimizer.clip_norm=0",
                            "--config.max_nonfinite_steps=3", "--config.log_every=10", "--config.save_every_steps=2",
                            steps=40))
  assert out.returncode == EXIT_NONFINITE
  assert last_line(out.stderr).startswith("train: error: stopped: 3 consecutive non-finite steps")
  record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
  assert record["step"] == 10 and record["nonfinite_run"] == 3 and record["skipped_steps"] == 3
  for step_dir in (run / "checkpoints").iterdir():  # every checkpoint was taken on the finite path
    assert json.loads((step_dir / "meta" / "metadata").read_text())["nonfinite"] == 0


def test_a_full_disk_fails_the_run_at_the_next_step_and_a_rerun_resumes_bitwise(tmp_path, pretrain_shards,
                                                                               tokenizer_dir):
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
    pytest.skip("needs to mount a small tmpfs (root) to fill a disk")
  try:
    reference = tmp_path / "reference"
    assert run_train(train_cmd(reference, pretrain_shards, tokenizer_dir)).returncode == 0
    run = disk / "run"
    cmd = train_cmd(run, pretrain_shards, tokenizer_dir, "--config.log_every=1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (run / "checkpoints" / "3" / "mimix_checksums.json").exists():
      assert proc.poll() is None, proc.stderr.read()[-2000:]
      time.sleep(0.05)
    subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=1M"], capture_output=True)  # fills it
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_SAVE_FAILED
    line = next(l for l in err.splitlines() if l.startswith("train: error:"))
    assert "No space left on device" in line and "the newest complete checkpoint is step 3" in line
    (disk / "filler").unlink()
    out = run_train(cmd)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stdout and losses_of(run) == losses_of(reference)
  finally:
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ------------------------------------------------------------------ user errors: one line, exit 2, nothing left

@pytest.fixture(scope="module")
def sft_shards_64(tokenizer_dir, tmp_path_factory):
  from conftest import SFT_DIR
  out = tmp_path_factory.mktemp("sft64") / "sft"
  assert run_preprocess(tokenizer_dir, out, "sft", [SFT_DIR / "chatterbot_en.jsonl.gz"], 64) == 0
  return out


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
  from conftest import train_tokenizer
  return train_tokenizer([CORPUS_TRAIN / "shakespeare_macbeth.txt.gz"], 2000, tmp_path_factory.mktemp("tok2") / "t",
                         "--seed", "7")


USER_ERRORS = {
    "missing tokenizer": (["--config.tokenizer_path={tmp}/no_tokenizer"], "no_tokenizer is not a tokenizer directory"),
    "unset tokenizer": (["--config.tokenizer_path="], "tokenizer_path is not set"),
    "unset data": (["--config.data.train_path="], "data.train_path is not set"),
    "missing data": (["--config.data.train_path={tmp}/nothing"], "nothing: no manifest.json"),
    "shards of another stage": (["--config.data.train_path={sft}"], "shards are for stage 'sft'"),
    "another max_len": (["--config.max_len=32"], "shards have max_len 64, config max_len is 32"),
    "missing init_from": (["--config.init_from={tmp}/no_run"], "no_run: neither a run directory"),
    "impossible mesh": (["--config.mesh.tensor=3"], "mesh.data=1, mesh.fsdp=-1, mesh.tensor=3 does not divide"),
    "batch": (["--config.grad_accum_steps=3"], "batch_size 4 is not divisible by grad_accum_steps 3"),
    "remat": (["--config.model.remat=fulll"], "model.remat must be one of none, full, save_dots"),
    "override type": (["--config.total_steps=many"], "--config.total_steps: expected an integer, got 'many'"),
    "vocabulary": (["--config.model.vocab_size=3000"], "model.vocab_size is 3000 but the tokenizer"),
    "another tokenizer": (["--config.tokenizer_path={tok2}"], "shards were made with the tokenizer"),
    "optimizer": (["--config.optimizer.name=sgd"], "optimizer.name must be one of adamw, muon, got 'sgd'"),
    "wsd fraction": (["--config.optimizer.schedule=wsd", "--config.optimizer.decay_fraction=2.0"],
                     "optimizer.decay_fraction must be between 0 and 1, got 2.0"),
}


@pytest.mark.parametrize("name", sorted(USER_ERRORS))
def test_user_errors_are_one_line_exit_2_and_leave_no_run_dir(name, tmp_path, pretrain_shards, tokenizer_dir,
                                                              sft_shards_64, other_tokenizer):
  overrides, message = USER_ERRORS[name]
  fill = dict(tmp=tmp_path, sft=sft_shards_64, tok2=other_tokenizer)
  run = tmp_path / "run"
  out = run_train(train_cmd(run, pretrain_shards, tokenizer_dir, *[o.format(**fill) for o in overrides]))
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("train: error: ") and message in out.stderr, out.stderr
  assert not run.exists()


def test_a_missing_config_file_is_named(tmp_path):
  out = run_train([sys.executable, "-m", "mimix_jax.train", "--config", "configs/nope.py:pretrain"])
  assert out.returncode == 2 and out.stderr == ("train: error: config file configs/nope.py does not exist (expected "
                                                "FILE.py:STAGE, e.g. configs/tiny.py:pretrain)\n")


def test_an_unset_vocabulary_follows_the_tokenizer(tmp_path, pretrain_shards, tokenizer_dir):
  run = tmp_path / "run"
  cmd = [c for c in train_cmd(run, pretrain_shards, tokenizer_dir, steps=1) if "vocab_size" not in c]
  assert run_train([*cmd, "--config.model.vocab_size=0"]).returncode == 0
  assert json.loads((run / "model.json").read_text())["model"]["vocab_size"] == 2000


def test_benchmark_tasks_during_training_go_to_eval_jsonl_as_the_evaluate_command_scores_them(
    tmp_path, pretrain_shards, tokenizer_dir):
  from mimix_jax.evaluation import sample_tasks
  files = sample_tasks.write(tmp_path / "tasks", n_eval=6, n_train=4)
  task_dir = files["arc_easy"]["test"].parent
  run = tmp_path / "run"
  out = run_train(train_cmd(run, pretrain_shards, tokenizer_dir, "--config.eval_tasks=arc_easy,lambada_openai",
                            f"--config.eval_task_dir={task_dir}", "--config.eval_tasks_every=4", steps=8))
  assert out.returncode == 0, out.stderr[-2000:]
  records = [json.loads(l) for l in (run / "eval.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [4, 8] and all("tasks/core" in r for r in records)
  assert "tasks/arc_easy/acc_norm" in records[-1] and "tasks/lambada_openai/acc_norm" not in records[-1]
  cmd = run_train([sys.executable, "-m", "mimix_jax.evaluate", "--checkpoint", str(run), "--tasks",
                   "arc_easy,lambada_openai", "--task_dir", str(task_dir)])
  assert cmd.returncode == 0, cmd.stderr[-2000:]
  result = json.loads(cmd.stdout.strip().splitlines()[-1])
  assert result["core"] == pytest.approx(records[-1]["tasks/core"], abs=1e-9)
  assert result["tasks"]["arc_easy"]["acc"] == records[-1]["tasks/arc_easy/acc"]
  bad = run_train(train_cmd(tmp_path / "bad", pretrain_shards, tokenizer_dir, "--config.eval_tasks=arc_easy,mmlu"))
  assert bad.returncode == 2 and "unknown task 'mmlu'" in bad.stderr and not (tmp_path / "bad").exists()
