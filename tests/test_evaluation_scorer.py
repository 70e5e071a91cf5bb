"""The JAX scorer equals an independent float64 computation over full forward passes, whatever the batching or
the mesh and however rows share contexts, with one compile; the task command end to end, and its one-line
errors."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from mimix_jax import evaluate as evaluate_cmd
from mimix_jax.evaluation import runner, sample_tasks
from mimix_jax.evaluation.scorer import CPU_BLOCK_BYTES, Scorer, _Steps
from mimix_jax.model import sharding
from mimix_jax.model import transformer as model_lib
from mimix_jax.model.config import ModelConfig
from mimix_jax.text.tokenizer import Tokenizer
from mimix_jax.training import checkpoints, run_dir

CFG = ModelConfig(vocab_size=2000, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_len=64)


def log_softmax64(model, tokens: np.ndarray) -> np.ndarray:
  """log p(. | tokens[:t+1]) for every t, float64, from one full forward pass: [len(tokens), vocab].

  The row is right-padded to max_len (causal: the padding changes nothing before it) so that one compiled
  forward serves every length."""
  padded = np.zeros((1, CFG.max_len), np.int32)
  padded[0, :len(tokens)] = tokens
  logits = np.asarray(_forward(model)(padded), np.float64)[0, :len(tokens), :CFG.vocab_size]
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


_FORWARDS = {}


def _forward(model):
  if id(model) not in _FORWARDS:
    _FORWARDS[id(model)] = jax.jit(lambda tokens: model(tokens))
  return _FORWARDS[id(model)]


def make_rows(model, n=40, seed=0):
  """Rows of every length up to max_len + 1 tokens with 1-12 scored tokens; every other row's continuation is
  the model's own greedy continuation, so greedy flags are exercised both ways. Every third row has 1-3
  siblings sharing its context, as a document's choices do (one-token siblings share even the scored position),
  and one row's context is a single token."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    length = int(rng.integers(2, CFG.max_len + 2))
    k = int(rng.integers(1, min(length - 1, 12) + 1))
    if i == 5:
      length = k + 1
    tokens = rng.integers(0, CFG.vocab_size, length).astype(np.int32)
    if i % 2:
      for j in range(length - k, length):
        tokens[j] = log_softmax64(model, tokens[:j])[-1].argmax()
    rows.append((tokens, k))
    context = tokens[:length - k]
    for _ in range(int(rng.integers(1, 4)) if i % 3 == 0 else 0):
      k2 = int(rng.integers(1, min(12, CFG.max_len + 1 - len(context)) + 1))
      rows.append((np.concatenate([context, rng.integers(0, CFG.vocab_size, k2)]).astype(np.int32), k2))
  return rows


def independent(model, rows):
  lls, greedy = [], []
  for tokens, k in rows:
    logp = log_softmax64(model, tokens[:-1])[-k:]
    targets = tokens[-k:]
    lls.append(logp[np.arange(k), targets].sum())
    greedy.append(bool((logp.argmax(-1) == targets).all()))
  return np.array(lls), np.array(greedy)


@pytest.fixture(scope="module")
def model_and_rows():
  model = model_lib.create(CFG, seed=0)
  return model, model_lib.init_params(CFG, seed=0), make_rows(model)


def test_scores_equal_an_independent_float64_computation(model_and_rows):
  model, params, rows = model_and_rows
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  lls, greedy = Scorer(CFG, params, mesh).score(rows)
  want_lls, want_greedy = independent(model, rows)
  assert lls.dtype == np.float32
  np.testing.assert_allclose(lls, want_lls, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(greedy, want_greedy)
  assert 0 < greedy.sum() < len(rows)
  contexts = [tokens[:len(tokens) - k].tobytes() for tokens, k in rows]
  assert len(set(contexts)) < len(rows) - 10  # many rows share a context
  assert any(len(tokens) == k + 1 for tokens, k in rows)  # a one-token context
  assert len({c for c, (_, k) in zip(contexts, rows) if k == 1 and contexts.count(c) > 1}) > 0  # a shared slot


def test_scores_do_not_depend_on_batching_or_mesh_and_compile_once(model_and_rows):
  _, params, rows = model_and_rows
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  eight = sharding.make_mesh(data=2, fsdp=4, tensor=1)  # conftest gives 8 CPU devices
  sharded = jax.device_put(params, model_lib.param_shardings(CFG, eight))
  reference = Scorer(CFG, params, one)
  lls, greedy = reference.score(rows)
  for scorer in (Scorer(CFG, params, one, batch_tokens=256), Scorer(CFG, sharded, eight, batch_tokens=1024)):
    got_lls, got_greedy = scorer.score(rows)
    np.testing.assert_allclose(got_lls, lls, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_greedy, greedy)
  # Rows of 1..64 inputs packed into rows of 64: one shape, one compile.
  assert reference._forward._cache_size() == 1
  reference.score(rows)  # the training loop scores the same prepared rows every time: nothing new to compile
  assert reference._forward._cache_size() == 1


def test_cpu_steps_take_the_same_rows_of_every_shard_and_put_each_row_back():
  t, shards = 8, 2
  cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=8, n_heads=1, n_kv_heads=1,
                    d_ff=CPU_BLOCK_BYTES // (4 * t * 2), max_len=t)  # 2 rows per shard per step
  steps = _Steps(cfg, shards, 0, on_cpu=True)
  assert steps.rows(t) == 2
  rows = np.arange(16 * t, dtype=np.float32).reshape(16, t)  # 16 rows: 8 per shard, 4 steps
  seen = []

  def trunk(arrays):  # each row minus its step's first value: the output shows which rows shared a step
    x = arrays[0]
    seen.append(x.shape)
    return (x - x[0, 0])[..., None]

  h = np.asarray(jax.jit(lambda x: steps.run(trunk, (x,)))(rows))[..., 0]
  assert seen == [(shards * 2, t)]  # traced once, under lax.map over the 4 steps
  for step in range(4):  # rows 2s, 2s+1 of shard 0's block (0-7) and the same of shard 1's (8-15)
    members = [2 * step, 2 * step + 1, 8 + 2 * step, 9 + 2 * step]
    np.testing.assert_array_equal(h[members], rows[members] - rows[2 * step, 0])


# ----------------------------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def run_and_tasks(tmp_path_factory, tokenizer_dir):
  root = tmp_path_factory.mktemp("evalcli")
  run = root / "run"
  run_dir.write_run_info(run, CFG, tokenizer_dir, dict(run_dir.DEFAULT_GENERATION))
  checkpoints.save_params(run, 0, model_lib.init_params(CFG, 1))
  files = sample_tasks.write(root / "tasks", n_eval=6, n_train=4)
  return run, files["arc_easy"]["test"].parent


def cli(*args):
  return subprocess.run([sys.executable, "-m", "mimix_jax.evaluate", *map(str, args)], capture_output=True,
                        text=True, cwd=REPO)


def test_command_prints_the_task_table_and_one_json_line(run_and_tasks, tmp_path):
  run, task_dir = run_and_tasks
  out = cli("--checkpoint", run, "--tasks", "arc_easy,lambada_openai,winogrande", "--task_dir", task_dir,
            "--num_fewshot", 1, "--limit", 4, "--output", tmp_path / "result.json")
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(result["tasks"]) == {"arc_easy", "lambada_openai", "winogrande"}
  assert result["tasks"]["arc_easy"]["n"] == 4 and result["tasks"]["winogrande"]["acc_norm"] is None
  assert "CORE" in out.stderr and "100%" in out.stderr  # the table, and a progress bar that reached its total
  saved = json.loads((tmp_path / "result.json").read_text())
  assert saved["tasks"] == result["tasks"] and len(saved["samples"]["arc_easy"]) == 4
  # The library on the same run gives the same numbers.
  info, params, mesh = evaluate_cmd.open_run(run)
  scorer, tok = Scorer(info.model, params, mesh), Tokenizer.load(info.tokenizer_dir)
  ev = runner.evaluate_tasks(scorer, tok, "arc_easy,lambada_openai,winogrande", task_dir, 1, 4, progress=False)
  assert ev.summary["tasks"] == result["tasks"] and ev.summary["core"] == pytest.approx(result["core"])


@pytest.mark.parametrize("setup, expected", [
    (lambda d: (d / "piqa.jsonl").write_text('{"goal": "g", "sol1": "a", "label": 0}\n'),
     "piqa.jsonl: row 1: field 'sol2' is missing"),
    (lambda d: None, "piqa.jsonl (or .parquet) not found"),
])
def test_command_bad_task_files_exit_2_with_one_line(run_and_tasks, tmp_path, setup, expected):
  run, _ = run_and_tasks
  setup(tmp_path)
  out = cli("--checkpoint", run, "--tasks", "piqa", "--task_dir", tmp_path)
  assert out.returncode == 2 and expected in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_command_unknown_task_exits_2(run_and_tasks):
  run, task_dir = run_and_tasks
  out = cli("--checkpoint", run, "--tasks", "arc_easy,mmlu", "--task_dir", task_dir)
  assert out.returncode == 2 and out.stderr.strip() == (
      "error: unknown task 'mmlu'; choose from hellaswag, arc_easy, arc_challenge, piqa, winogrande, openbookqa, "
      "boolq, lambada_openai")
