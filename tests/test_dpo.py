"""DPO training through the train command: the precomputed reference table and a frozen reference copy agree."""

import subprocess
import sys

from test_train import REPO, SMALL_MODEL, env, losses_of


def dpo_cmd(run_dir, shards, tokenizer_dir, reference):
  return [sys.executable, "-m", "mimix_jax.train", "--config", "configs/tiny.py:dpo", "--workdir", str(run_dir),
          f"--config.data.train_path={shards}", f"--config.tokenizer_path={tokenizer_dir}", "--config.init_from=",
          "--config.max_len=128", "--config.batch_size=4", "--config.total_steps=3", "--config.log_every=1",
          f"--config.dpo.reference={reference}", *SMALL_MODEL]


def test_precomputed_and_frozen_reference_give_the_same_training(tmp_path, dpo_shards, tokenizer_dir):
  runs = {}
  for reference in ("precompute", "frozen"):
    run = tmp_path / reference
    out = subprocess.run(dpo_cmd(run, dpo_shards, tokenizer_dir, reference), cwd=REPO, env=env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    runs[reference] = losses_of(run)
  assert (tmp_path / "precompute" / "reference_logps_train.npy").exists()
  assert not (tmp_path / "frozen" / "reference_logps_train.npy").exists()
  for step, loss in runs["precompute"].items():
    assert abs(runs["frozen"][step] - loss) < 1e-5 * abs(loss)
