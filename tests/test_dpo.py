"""DPO through the train command: the reference log-probs in the batches are the initial policy's, computed once
before training and read back (not recomputed) by a resumed run, which then trains exactly as an uninterrupted one."""

import subprocess
import sys

import jax
import numpy as np

from test_train import REPO, SMALL_MODEL, env, losses_of
from mimix_jax.data.pipeline import make_iterator
from mimix_jax.model import transformer as model_lib
from mimix_jax.training import config as config_lib, losses


def dpo_cmd(run_dir, shards, tokenizer_dir, steps):
  return [sys.executable, "-m", "mimix_jax.train", "--config", "configs/tiny.py:dpo", "--workdir", str(run_dir),
          f"--config.data.train_path={shards}", f"--config.tokenizer_path={tokenizer_dir}", "--config.init_from=",
          "--config.max_len=128", "--config.batch_size=4", f"--config.total_steps={steps}", "--config.log_every=1",
          "--config.save_every_steps=2", "--config.optimizer.schedule=constant", "--config.seed=3", *SMALL_MODEL]


def test_reference_table_is_the_initial_policy_and_a_resumed_run_reuses_it(tmp_path, dpo_shards, tokenizer_dir):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  for run, steps in ((straight, 4), (resumed, 2), (resumed, 4)):
    out = subprocess.run(dpo_cmd(run, dpo_shards, tokenizer_dir, steps), cwd=REPO, env=env(), capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    if run == resumed and steps == 2:
      table_file = resumed / "reference_logps_train.npy"
      first_write = table_file.stat().st_mtime_ns
  assert table_file.stat().st_mtime_ns == first_write  # read back, not recomputed
  assert losses_of(resumed) == losses_of(straight)

  # The table holds the summed completion log-probs of the stage's initial params (here: seed 3, no init_from).
  cfg = config_lib.load("configs/tiny.py:dpo", [c for c in dpo_cmd(resumed, dpo_shards, tokenizer_dir, 4)
                                                if c.startswith("--config.model.") or c.startswith("--config.max_len")])
  model_cfg = config_lib.model_config(cfg)
  model = model_lib.from_params(model_cfg, model_lib.init_params(model_cfg, 3))
  batch = next(make_iterator(str(dpo_shards), stage="dpo", global_batch_size=8, seed=0, shuffle=False, num_epochs=1))
  expected, _ = losses.sequence_logps(model, {k: jax.numpy.asarray(v) for k, v in batch.items() if k != "index"})
  table = np.load(table_file)
  np.testing.assert_allclose(table[batch["index"]], np.asarray(expected), rtol=1e-5, atol=1e-4)
