"""Generation engine, samplers and the generate CLI, on a small random model and the suite's real tokenizer."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimix_jax import generate as generate_cmd
from mimix_jax.inference import generation, sampling
from mimix_jax.inference.engine import Engine, generate_ids
from mimix_jax.inference.sampling import SamplingConfig
from mimix_jax.model import transformer as model_lib
from mimix_jax.model.config import ModelConfig
from mimix_jax.text import tokenizer as tokenizer_lib
from mimix_jax.training import checkpoints, run_dir as run_dir_lib

GREEDY = SamplingConfig(temperature=0.0)
# init_std 0.1: a 0.02 random model repeats one token forever, which would hide cache or padding bugs.
SMALL = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_len=64, init_std=0.1)


def params_of(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def engine_of(model) -> Engine:
  return Engine(model.cfg, params_of(model))


def run_engine(run_dir) -> Engine:
  """The engine of a saved run, as the commands build it."""
  return Engine(run_dir_lib.read_run_info(run_dir).model, checkpoints.load_params(run_dir))


def make_run(root, tokenizer_dir, vocab_size: int, generation: dict | None = None, **overrides):
  """A run directory holding a random small model (seed 0) and the tokenizer; returns (run_dir, model)."""
  cfg = ModelConfig(vocab_size=vocab_size, **{**SMALL, **overrides})
  model = model_lib.create(cfg, seed=0)
  run_dir_lib.write_run_info(root, cfg, tokenizer_dir, {**run_dir_lib.DEFAULT_GENERATION, **(generation or {})})
  checkpoints.save_params(root, 1, params_of(model))
  return root, model


@pytest.fixture(scope="module")
def model(tok):
  return model_lib.create(ModelConfig(vocab_size=tok.vocab_size, **SMALL), seed=0)


@pytest.fixture(scope="module")
def engine(model):
  return engine_of(model)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, segment_ids):
  return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids)


def greedy_without_cache(model, prompt: list[int], n: int, stop_ids=()) -> list[int]:
  """The reference: a full forward pass over the whole sequence (no cache) for every new token.

  The sequence is right-padded to max_len with segment id 0 (one compiled shape); causal attention keeps
  the padding from changing the real tokens' logits.
  """
  graphdef, state = nnx.split(model)
  seq = list(prompt)
  for _ in range(n):
    tokens = np.zeros((1, model.cfg.max_len), np.int32)
    tokens[0, :len(seq)] = seq
    logits = _forward(graphdef, state, tokens, (np.arange(model.cfg.max_len) < len(seq))[None].astype(np.int32))
    nxt = int(jnp.argmax(logits[0, len(seq) - 1]))
    if nxt in stop_ids:
      break
    seq.append(nxt)
  return seq[len(prompt):]


PROMPTS = [[5, 300, 42, 1200], list(range(600, 613)), [999]]


def test_greedy_with_cache_equals_full_forward_passes(model, engine):
  out = generate_ids(engine, PROMPTS, stop_ids=[], pad_id=0, max_new_tokens=10)
  for prompt, g in zip(PROMPTS, out):
    assert g.tokens == greedy_without_cache(model, prompt, 10)
    assert g.finish_reason == "length"
  assert len({tuple(g.tokens) for g in out}) == 3


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(engine):
  # (Greedy batches already match unbatched full forward passes above; this checks seeded sampling.)
  config = SamplingConfig(temperature=0.9, top_k=40, top_p=0.9, seed=7)
  batched = generate_ids(engine, PROMPTS, stop_ids=[], pad_id=0, sampling=config, max_new_tokens=8)
  for i, prompt in enumerate(PROMPTS):
    # Alone, the prompt is row 0 of its request, so give row i's key by padding the request with copies.
    alone = generate_ids(engine, [prompt] * (i + 1), stop_ids=[], pad_id=0, sampling=config,
                             max_new_tokens=8, batch_size=1)[i]
    assert alone.tokens == batched[i].tokens


def test_same_seed_gives_the_same_sample(engine):
  def run(seed):
    config = SamplingConfig(temperature=1.0, seed=seed)
    return [g.tokens for g in generate_ids(engine, PROMPTS, stop_ids=[], pad_id=0, sampling=config,
                                               max_new_tokens=8)]
  assert run(3) == run(3)
  assert run(3) != run(4)


def test_top_k_of_one_samples_the_greedy_tokens(engine):
  greedy = generate_ids(engine, PROMPTS, stop_ids=[], pad_id=0, max_new_tokens=6)
  top1 = generate_ids(engine, PROMPTS, stop_ids=[], pad_id=0, max_new_tokens=6,
                          sampling=SamplingConfig(temperature=1.5, top_k=1, seed=1))
  assert [g.tokens for g in top1] == [g.tokens for g in greedy]


def kept(logits, top_k=0, top_p=1.0, min_p=0.0) -> list[list[int]]:
  out = jax.jit(sampling.filter_logits)(jnp.asarray(logits, jnp.float32), jnp.int32(top_k), jnp.float32(top_p),
                               jnp.float32(min_p))
  return [np.flatnonzero(np.isfinite(row)).tolist() for row in np.asarray(out)]


def test_top_k_keeps_exactly_k_even_with_ties():
  # The reference keeps every logit >= the (k+1)-th largest: here k=2 would keep ids 0..3 (four tokens).
  assert kept([[3.0, 2.0, 2.0, 2.0, 1.0]], top_k=2) == [[0, 1]]
  rng = np.random.default_rng(0)
  for k in (1, 5, 50):
    assert all(len(row) == k for row in kept(rng.normal(size=(4, 300)), top_k=k))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
  logits = np.log([[0.5, 0.05, 0.3, 0.15]])
  assert kept(logits, top_p=0.75) == [[0, 2]]
  assert kept(logits, top_p=0.85) == [[0, 2, 3]]
  assert kept(logits, top_p=0.3) == [[0]]  # the top token alone already exceeds p
  rng = np.random.default_rng(1)
  for p in (0.1, 0.5, 0.9, 0.99):
    x = rng.normal(size=(3, 200)) * 2
    for row, got in zip(x, kept(x, top_p=p)):
      probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
      order = np.argsort(-probs)
      n = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1  # first prefix whose mass reaches p
      assert sorted(got) == sorted(order[:n].tolist())


def test_min_p_and_the_filters_intersect():
  logits = np.log([[0.4, 0.3, 0.2, 0.06, 0.04]])
  assert kept(logits, min_p=0.5) == [[0, 1, 2]]  # p >= 0.2 = 0.5 * 0.4
  assert kept(logits, min_p=0.5, top_k=2) == [[0, 1]]
  assert kept(logits, top_k=4, top_p=0.65) == [[0, 1]]


def reference_repetition_penalty(logits, history, penalty, decay=1.0, window=None, max_penalty=None):
  """NumPy transcription of the reference's process_repetition_penalty, with max_repetition_penalty applied."""
  logits = np.array(logits, np.float64)
  history = np.asarray(history)
  if window:
    history = history[:, -window:]
  decays = (np.full(history.shape[-1], decay) ** np.arange(history.shape[-1]))[::-1]
  mask = np.zeros_like(logits)
  for b in range(len(history)):
    np.add.at(mask[b], history[b], decays)
  factor = np.where(logits < 0, penalty, 1 / penalty) ** mask
  if max_penalty:
    factor = np.clip(factor, 1 / max_penalty, max_penalty)
  return logits * factor


@pytest.mark.parametrize("penalty,decay,window,max_penalty", [
    (1.3, 1.0, 0, 0.0),  # plain: the factor compounds with the count
    (1.5, 0.8, 0, 0.0),  # decayed by distance from the newest token
    (1.3, 0.9, 4, 0.0),  # only the last 4 tokens
    (2.0, 1.0, 0, 3.0),  # clamped: 2**3 would be 8
])
def test_repetition_penalty_matches_the_reference_formula(penalty, decay, window, max_penalty):
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 12)) * 3
  history = np.array([[1, 2, 2, 5, 2, 7, 1, 2], [0, 0, 0, 3, 11, 3, 0, 9]])
  count = 6  # the buffer holds 8 slots, 6 generated so far
  want = reference_repetition_penalty(logits, history[:, :count], penalty, decay, window, max_penalty)
  weights = sampling.repetition_weights(jnp.asarray(history), jnp.int32(count), 12, jnp.int32(window),
                                        jnp.float32(decay))
  got = sampling.apply_repetition_penalty(jnp.asarray(logits, jnp.float32), weights, jnp.float32(penalty),
                                          jnp.float32(max_penalty))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_repetition_penalty_in_decoding_changes_only_repeats(engine):
  plain = generate_ids(engine, PROMPTS, stop_ids=[], pad_id=0, max_new_tokens=12)
  penalized = generate_ids(engine, PROMPTS, stop_ids=[], pad_id=0, max_new_tokens=12,
                               sampling=SamplingConfig(temperature=0.0, repetition_penalty=1e6))
  for a, b in zip(plain, penalized):
    # Identical until the plain run first repeats a generated token; the penalized run never repeats.
    first_repeat = next((i for i, t in enumerate(a.tokens) if t in a.tokens[:i]), len(a.tokens))
    assert b.tokens[:first_repeat] == a.tokens[:first_repeat]
    assert len(set(b.tokens)) == len(b.tokens)


def test_generation_stops_on_eot(tok, model):
  # Make <|eot_id|> likely: its output embedding becomes twice that of the token greedy picks 4th.
  free = greedy_without_cache(model, tok.encode("The king", bos=True), 12)
  params = params_of(model)
  params["embed"] = params["embed"].at[tok.eot_id].set(2 * params["embed"][free[3]])
  surgered = model_lib.from_params(model.cfg, params)
  prompt = tok.encode("The king", bos=True)
  want = greedy_without_cache(surgered, prompt, 12, stop_ids={tok.eot_id})
  assert len(want) < 12
  [g] = generation.generate(engine_of(surgered), tok, ["The king"], sampling=GREEDY, max_new_tokens=12)
  assert g.tokens == want and g.finish_reason == "stop"
  assert tok.eot_id in tokenizer_lib.stop_ids(tok) and tok.eos_id in tokenizer_lib.stop_ids(tok)


def test_context_limit_and_too_long_prompts(engine, model):
  near_full = list(range(300, 300 + model.cfg.max_len - 3))
  [g] = generate_ids(engine, [near_full], stop_ids=[], pad_id=0, max_new_tokens=10)
  assert len(g.tokens) == 3 and g.finish_reason == "context"
  with pytest.raises(ValueError, match="leaves no room to generate"):
    generate_ids(engine, [list(range(300, 300 + model.cfg.max_len))], stop_ids=[], pad_id=0)


def test_stream_yields_the_text_of_generate(tok, engine):
  config = SamplingConfig(temperature=0.8, seed=5)
  [g] = generation.generate(engine, tok, ["Once upon a time"], sampling=config, max_new_tokens=16)
  s = generation.stream(engine, tok, "Once upon a time", sampling=config, max_new_tokens=16)
  pieces = list(s)
  assert "".join(pieces) == g.text and s.tokens == g.tokens and s.finish_reason == g.finish_reason
  assert all("\ufffd" not in p for p in pieces) or "\ufffd" in g.text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer_dir, tok):
  return make_run(tmp_path_factory.mktemp("gen_run"), tokenizer_dir, tok.vocab_size)[0]


def test_cli_json_prompt_file_matches_the_library(run_dir, tmp_path, tok, capsys):
  prompts = ["The king", "What is love?"]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
  assert generate_cmd.main(["--checkpoint", str(run_dir), "--prompt_file", str(tmp_path / "prompts.txt"), "--chat",
                   "--json", "--temperature", "0.7", "--top_p", "0.9", "--seed", "3", "--max_new_tokens", "8"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  want = generation.generate(run_engine(run_dir), tok, prompts, chat=True, max_new_tokens=8,
                      sampling=SamplingConfig(temperature=0.7, top_p=0.9, seed=3))
  assert [(row["prompt"], row["text"], row["tokens"]) for row in rows] == [(p, g.text, g.tokens)
                                                                            for p, g in zip(prompts, want)]


def test_cli_reports_bad_input_in_one_line(run_dir, tmp_path, capsys):
  assert generate_cmd.main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "nope" in err
  assert generate_cmd.main(["--checkpoint", str(run_dir), "--prompt", "word " * 200]) == 2
  assert "leaves no room to generate" in capsys.readouterr().err
  assert generate_cmd.main(["--checkpoint", str(run_dir), "--prompt_file", str(tmp_path / "missing.txt")]) == 2


def test_cli_command_streams_one_prompt(run_dir, tok):
  r = subprocess.run([sys.executable, "-m", "mimix_jax.generate", "--checkpoint", str(run_dir), "--prompt",
                      "The king", "--greedy", "--max_new_tokens", "8"], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  [g] = generation.generate(run_engine(run_dir), tok, ["The king"], sampling=GREEDY, max_new_tokens=8)
  assert r.stdout == g.text + "\n"
