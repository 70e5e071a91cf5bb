"""Decode speed: mimix_jax's engine vs transformers' LlamaForCausalLM.generate, same shapes, on this machine.

    python bench/bench_decode.py [--presets tiny base] [--prompt_len 64] [--new_tokens 32] [--repeats 3]

Both models are randomly initialised with the preset's architecture (HF: LlamaConfig with tied embeddings,
rope_theta 500000, rms_norm_eps 1e-5, no biases), float32, greedy, and forced to generate exactly
`new_tokens` tokens (no stop ids / eos). Every prompt has prompt_len tokens, so neither side pads.

  ttft    time to first token: prefill of the prompt plus the first token, on the host (median)
  decode  tokens/s over the remaining new_tokens - 1 steps, all rows counted: B * (N - 1) / (t_N - t_1)

Compilation (JAX) and warm-up (HF) are excluded; the two alternate run by run, so that load from other
processes on a shared machine hits both alike. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np

from mimix_jax import model as model_lib
from mimix_jax.generate import Engine, bucket
from mimix_jax.model_config import ModelConfig, preset
from mimix_jax.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)


def jax_runner(cfg: ModelConfig, prompts: np.ndarray):
  """run(n): Engine.start + Engine.finish for n new tokens, the tokens fetched to the host."""
  engine = Engine(model_lib.create(cfg, seed=0))
  batch, prompt_len = prompts.shape
  rows = prompts.tolist()

  def run(n: int):
    cache = engine.new_cache(batch, bucket(prompt_len) + bucket(n))
    state = engine.start(cache, rows, sampling=GREEDY, stop_ids=[], max_new_tokens=n, pad_id=0)
    if n > 1:
      state = engine.finish(state)
    np.asarray(state.tokens)

  return run


def hf_config(cfg: ModelConfig):
  from transformers import LlamaConfig
  return LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=cfg.max_len, rope_theta=cfg.rope_base,
      rms_norm_eps=cfg.norm_eps, attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
      bos_token_id=None, eos_token_id=None, pad_token_id=0)


def hf_runner(cfg: ModelConfig, prompts: np.ndarray):
  """run(n): LlamaForCausalLM.generate (greedy, KV cache) for exactly n new tokens."""
  import torch
  from transformers import LlamaForCausalLM
  torch.manual_seed(0)
  model = LlamaForCausalLM(hf_config(cfg)).eval()
  ids = torch.as_tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(ids)

  def run(n: int):
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, use_cache=True)
    assert out.shape[1] == prompts.shape[1] + n

  return run


def measure(runners: dict, new_tokens: int, repeats: int, batch: int) -> dict[str, tuple[float, float]]:
  """{name: (ttft s, decode tokens/s)}; the runners alternate so that load from other processes hits both."""
  for run in runners.values():  # compile / warm up
    run(1), run(new_tokens)
  times = {name: {1: [], new_tokens: []} for name in runners}
  for _ in range(repeats):
    for n in (1, new_tokens):
      for name, run in runners.items():
        t0 = time.perf_counter()
        run(n)
        times[name][n].append(time.perf_counter() - t0)
  out = {}
  for name, t in times.items():
    t1, tn = statistics.median(t[1]), statistics.median(t[new_tokens])
    out[name] = (t1, batch * (new_tokens - 1) / (tn - t1))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)

  import torch
  import transformers
  print(f"# {platform.processor() or platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, float32\n")
  print("| model | batch | mimix_jax TTFT (ms) | HF TTFT (ms) | mimix_jax decode (tok/s) | HF decode (tok/s) "
        "| decode speed-up |")
  print("|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for name in args.presets:
    cfg = preset(name)
    for batch in args.batches:
      prompts = rng.integers(1, cfg.vocab_size - 1, (batch, args.prompt_len))
      r = measure(dict(jax=jax_runner(cfg, prompts), hf=hf_runner(cfg, prompts)), args.new_tokens, args.repeats,
                  batch)
      (jt, jr), (ht, hr) = r["jax"], r["hf"]
      print(f"| {name} | {batch} | {jt * 1e3:.0f} | {ht * 1e3:.0f} | {jr:.1f} | {hr:.1f} | {jr / hr:.2f}x |",
            flush=True)


if __name__ == "__main__":
  main()
