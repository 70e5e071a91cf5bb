"""Perplexity: equals exp(mean NLL) computed independently; sliding windows do not depend on the batch size."""

import gzip
import json
import math
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO, SMALL_BOOKS
from mimix_jax.evaluation import perplexity as evaluate
from mimix_jax.model import sharding
from mimix_jax.model import transformer as model_lib
from mimix_jax.model.config import ModelConfig
from mimix_jax.training import checkpoints, run_dir

CFG = ModelConfig(vocab_size=2000, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_len=48)


def setup(seed=0):
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return model_lib.create(CFG, seed), mesh, evaluate.make_nll_fn(CFG, mesh), model_lib.init_params(CFG, seed)


def independent_nll(model, doc):
  """Sum of -log p(doc[t] | doc[:t]) for t >= 1 from one full forward pass, float64 log-softmax."""
  logits = np.asarray(model(doc[None, :-1]), np.float64)[0, :, : CFG.vocab_size]
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  return -logp[np.arange(len(doc) - 1), doc[1:]].sum()


def test_perplexity_equals_exp_of_mean_token_nll(tok):
  model, mesh, nll_fn, params = setup()
  texts = ["To be, or not to be: that is the question.", "Out, out, brief candle!", "A horse! a horse!"]
  docs = [np.asarray(tok.encode(t, bos=True, eos=True), np.int32) for t in texts]
  assert all(len(d) <= CFG.max_len for d in docs)
  with sharding.activate(mesh):
    got = evaluate.perplexity(nll_fn, params, mesh, docs, CFG.max_len, CFG.max_len // 2, batch_size=2)
  total = sum(independent_nll(model, d) for d in docs)
  tokens = sum(len(d) - 1 for d in docs)  # every token after bos, eos included
  assert got["tokens"] == tokens
  np.testing.assert_allclose(got["loss"], total / tokens, rtol=1e-5)
  np.testing.assert_allclose(got["ppl"], math.exp(total / tokens), rtol=1e-5)


def test_sliding_window_scores_every_target_once_whatever_the_batch_size(tok):
  _, mesh, nll_fn, params = setup(1)
  book = gzip.open(SMALL_BOOKS[0], "rt").read()[:3000]
  doc = np.asarray(tok.encode(book, bos=True, eos=True), np.int32)
  assert len(doc) > 4 * CFG.max_len
  for stride in (7, 24, 48):
    windows = list(evaluate.windows(doc, CFG.max_len, stride))
    assert sum(n for _, n in windows) == len(doc) - 1
    assert all(len(w) - 1 <= CFG.max_len for w, _ in windows)
  with sharding.activate(mesh):
    results = [evaluate.perplexity(nll_fn, params, mesh, [doc], CFG.max_len, 16, batch_size=b) for b in (1, 3, 8)]
  assert len({r["tokens"] for r in results}) == 1
  for r in results[1:]:
    np.testing.assert_allclose(r["loss"], results[0]["loss"], rtol=1e-6)


def test_evaluate_command_prints_json_for_a_run_directory(tmp_path, tokenizer_dir, pretrain_shards):
  run = tmp_path / "run"
  run_dir.write_run_info(run, CFG, tokenizer_dir, dict(run_dir.DEFAULT_GENERATION))
  checkpoints.save_params(run, 0, model_lib.init_params(CFG, 2))
  out = subprocess.run([sys.executable, "-m", "mimix_jax.evaluate", "--checkpoint", str(run), "--data",
                        str(SMALL_BOOKS[1]), "--stride", "16", "--output", str(tmp_path / "ppl.json")],
                       capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["tokens"] > 1000 and math.isfinite(result["ppl"])
  assert result["ppl"] == json.loads((tmp_path / "ppl.json").read_text())["ppl"]
  assert abs(math.log(result["ppl"]) - math.log(CFG.vocab_size)) < 1.0  # an untrained model is near uniform
  bad = subprocess.run([sys.executable, "-m", "mimix_jax.evaluate", "--checkpoint", str(tmp_path / "missing"),
                        "--data", str(SMALL_BOOKS[1])], capture_output=True, text=True, cwd=REPO)
  assert bad.returncode == 2 and "neither a run directory" in bad.stderr
  # A shard directory (or any input with no text) scores nothing: an error, not a perplexity of 1.
  empty = subprocess.run([sys.executable, "-m", "mimix_jax.evaluate", "--checkpoint", str(run), "--data",
                          str(pretrain_shards), "--output", str(tmp_path / "none.json")], capture_output=True,
                         text=True, cwd=REPO)
  assert empty.returncode == 2 and "error: no text to score in" in empty.stderr
  assert not any(line.startswith("{") for line in empty.stdout.splitlines())  # no result
  assert not (tmp_path / "none.json").exists()
