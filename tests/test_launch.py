"""Every launch script parses, answers --help, and in --dry_run prints the commands it would run."""

import subprocess
from pathlib import Path

import pytest

from mimix_jax.training import config as config_lib

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "launch").rglob("*") if p.suffix in (".sh", ".sbatch") and p.name != "common.sh")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_parses_and_has_help(script):
  subprocess.run(["bash", "-n", str(script)], check=True)
  out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0 and out.stdout.startswith("usage:")


def test_gpt_large_recipe_dry_run_uses_the_paths_the_configs_expect():
  out = subprocess.run(["bash", "launch/gpt_large/run_all.sh", "--dry_run"], capture_output=True, text=True,
                       cwd=REPO, check=True).stdout
  commands = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
  assert len(commands) >= 14
  for stage in ("pretrain", "pretrain_2048", "sft", "dpo"):
    cfg = config_lib.load(f"configs/gpt_large.py:{stage}")
    train = next(c for c in commands if f"configs/gpt_large.py:{stage} " in c + " ")
    assert f"--workdir runs/gpt_large/{stage}" in train
    # The shards this stage reads are what the preprocess step writes; init_from is the previous stage's run.
    assert any(f"--output {cfg.data.train_path}" in c for c in commands if "mimix_jax.preprocess" in c)
    assert any(f"--output {cfg.tokenizer_path}" in c for c in commands if "mimix_jax.tokenizer" in c)
    if cfg.init_from:
      assert any(f"--workdir {cfg.init_from}" in c for c in commands)
