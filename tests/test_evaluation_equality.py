"""Our task evaluator against lm-evaluation-harness 0.4.13 run on our Hugging Face export: identical requests,
predictions and accuracies on every example of every task, at 0 shots and at 2.

A tiny model is trained with the project's commands (preprocess -> train 300 steps, enough for some greedy
LAMBADA hits) and exported with `python -m mimix_jax.export` (which verifies logits and tokenizer); the task
files come from shipped text (sample_tasks). lm_eval runs offline with local task configs that include its
own YAMLs; our evaluator runs in this process on the 8-device test mesh. Slow (about 3 minutes on 2 cores):
`pytest -m slow` runs it alone, `-m "not slow"` skips it.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from bench import lm_eval_harness as harness
from conftest import REPO, SMALL_BOOKS, run_preprocess
from mimix_jax.evaluation import runner, sample_tasks
from mimix_jax import evaluate as evaluate_cmd
from mimix_jax.evaluation.scorer import Scorer
from mimix_jax.text.tokenizer import Tokenizer
from mimix_jax.evaluation.tasks import TASKS

pytestmark = pytest.mark.slow
SHOTS = (0, 2)
MODEL = ["--config.model.vocab_size=2000", "--config.model.n_layers=2", "--config.model.d_model=64",
         "--config.model.n_heads=4", "--config.model.n_kv_heads=2", "--config.model.d_ff=128"]


@pytest.fixture(scope="module")
def run_and_export(tokenizer_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("equality")
  assert run_preprocess(tokenizer_dir, root / "shards", "pretrain", SMALL_BOOKS, 128) == 0
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(REPO)}
  subprocess.run([sys.executable, "-m", "mimix_jax.train", "--config", f"{REPO}/configs/tiny.py:pretrain",
                  "--workdir", str(root / "run"), f"--config.data.train_path={root / 'shards'}",
                  f"--config.tokenizer_path={tokenizer_dir}", "--config.init_from=", "--config.max_len=128",
                  "--config.batch_size=8", "--config.total_steps=300", "--config.save_every_steps=300",
                  "--config.log_every=50", "--config.optimizer.lr=3e-3", "--config.optimizer.warmup_steps=10",
                  *MODEL], check=True, cwd=REPO, env=env, capture_output=True)
  subprocess.run([sys.executable, "-m", "mimix_jax.export", "--checkpoint", str(root / "run"), "--output",
                  str(root / "hf")], check=True, cwd=REPO, env=env, capture_output=True)
  return root / "run", root / "hf"


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
  return sample_tasks.write(tmp_path_factory.mktemp("tasks"), n_eval=24, n_train=10)


@pytest.fixture(scope="module")
def reference(run_and_export, task_files, tmp_path_factory):
  """{shots: (lm-eval's results json, {task: samples})}; both runs at once, one torch thread each."""
  _, export = run_and_export
  root = tmp_path_factory.mktemp("lm_eval")
  names = harness.write_configs(task_files, root / "configs", cache_dir=root / "cache")
  procs = {k: harness.start(export, root / "configs", names, k, root / f"out{k}", root / "cache", threads=1)
           for k in SHOTS}
  for proc in procs.values():
    harness.finish(proc)
  return {k: harness.read_samples(root / f"out{k}") for k in SHOTS}


@pytest.fixture(scope="module")
def ours(run_and_export, task_files):
  run, _ = run_and_export
  info, params, mesh = evaluate_cmd.open_run(run)  # all 8 test devices: sharded as training shards
  scorer, tok = Scorer(info.model, params, mesh), Tokenizer.load(info.tokenizer_dir)
  task_dir = task_files["arc_easy"]["test"].parent
  out = {}
  for k in SHOTS:
    prepared = runner.prepare(tok, list(TASKS), scorer.max_len, task_dir, num_fewshot=k)
    out[k] = prepared, runner.run(scorer, prepared, progress=False)
  return out


@pytest.mark.parametrize("shots", SHOTS)
def test_every_example_of_every_task_is_scored_as_lm_eval_scores_it(shots, reference, ours):
  results, samples = reference[shots]
  prepared, evaluation = ours[shots]
  assert set(samples) == set(TASKS) and results["max_length"] == 128
  for name, task in TASKS.items():
    examples, records = prepared.examples[name], evaluation.records[name]
    assert len(samples[name]) == len(records) == 24
    for sample, ex, record in zip(samples[name], examples, records):
      where = (name, shots, ex.doc_id)
      assert sample["doc_id"] == ex.doc_id and harness.requests_of(sample) == ex.requests, where
      lls, greedy = harness.responses_of(sample)
      assert record["greedy"] == greedy, where
      np.testing.assert_allclose(record["loglikelihoods"], lls, rtol=0, atol=2e-3, err_msg=str(where))
      if task.output_type == "multiple_choice":
        assert (record["pred"], record["pred_norm"]) == (int(np.argmax(lls)), int(np.argmax(
            np.array(lls) / [len(c) for c in ex.choices]))), where
      for metric in task.metrics:
        assert record[metric] == sample[metric], (where, metric)
    summary = evaluation.summary["tasks"][name]
    theirs = results["results"][harness.PREFIX + name]
    assert summary["acc"] == theirs["acc,none"] and summary["n"] == theirs["sample_len"]
    assert summary["acc_norm"] == theirs.get("acc_norm,none")  # both None where lm-eval reports no acc_norm


def test_the_comparison_covers_greedy_hits_and_truncated_contexts(reference, ours):
  """Without these the equality above would prove less: some greedy continuations (LAMBADA's acc), and
  few-shot contexts longer than the model's 128 tokens (lm-eval's left truncation)."""
  _, evaluation = ours[0]
  assert evaluation.summary["tasks"]["lambada_openai"]["acc"] > 0
  prepared, _ = ours[2]
  truncated = sum(len(tokens) == 129 for tokens, _ in prepared.rows)
  assert truncated > len(prepared.rows) // 10
  _, samples = reference[2]
  assert any(any(harness.responses_of(s)[1]) for task in samples.values() for s in task)
