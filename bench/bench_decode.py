"""Decode speed: mimix_jax's engine vs transformers' LlamaForCausalLM.generate, same shapes, on this machine.

    python bench/bench_decode.py [--presets tiny base] [--batches 1 8] [--prompt_len 64] [--new_tokens 32]

Both models are randomly initialised with the preset's architecture (HF: LlamaConfig with tied embeddings,
rope_theta 500000, rms_norm_eps 1e-5, no biases), float32, greedy, and forced to generate exactly
`new_tokens` tokens (no stop ids / eos). Every prompt has prompt_len tokens, so neither side pads. Where there
is a GPU, both run on it.

  ttft    time to first token: prefill of the prompt plus the first token, on the host (median)
  decode  tokens/s over the remaining new_tokens - 1 steps, all rows counted: B * (N - 1) / (t_N - t_1)

Each framework runs in its own fresh process (XLA's and PyTorch's thread pools spin after work and starve
each other when they share one); compilation (JAX) and warm-up (HF) are excluded. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import statistics
import time

import numpy as np

from mimix_jax.model.config import ModelConfig, preset


def jax_runner(cfg: ModelConfig, prompts: np.ndarray, new_tokens: int):
  """run(n): Engine.start + Engine.finish for n <= new_tokens new tokens, the tokens fetched to the host."""
  from mimix_jax.inference.engine import Engine, bucket
  from mimix_jax.inference.sampling import SamplingConfig
  from mimix_jax.model import transformer
  engine = Engine(cfg, transformer.init_params(cfg, seed=0))
  batch, prompt_len = prompts.shape
  rows = prompts.tolist()

  greedy = SamplingConfig(temperature=0.0)

  def run(n: int):
    cache = engine.new_cache(batch, bucket(prompt_len) + bucket(new_tokens))
    state = engine.start(cache, rows, sampling=greedy, stop_ids=[], max_new_tokens=n, pad_id=0)
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


def hf_runner(cfg: ModelConfig, prompts: np.ndarray, threads: int):
  """run(n): LlamaForCausalLM.generate (greedy, KV cache) for exactly n new tokens, the tokens fetched to the
  host; on the GPU where there is one (as JAX is), else on `threads` CPU threads."""
  import torch
  from transformers import LlamaForCausalLM
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = LlamaForCausalLM(hf_config(cfg)).eval().to(device)
  ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
  mask = torch.ones_like(ids)

  def run(n: int):
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, use_cache=True).cpu()
    assert out.shape[1] == prompts.shape[1] + n

  return run


def measure(side: str, name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int,
            threads: int = 0) -> tuple[float, float]:
  """(ttft s, decode tokens/s) of "jax" or "hf" (on `threads` threads); meant to run in a fresh process."""
  cfg = preset(name)
  prompts = np.random.default_rng(0).integers(1, cfg.vocab_size - 1, (batch, prompt_len))
  run = jax_runner(cfg, prompts, new_tokens) if side == "jax" else hf_runner(cfg, prompts, threads)
  run(1), run(new_tokens)  # compile / warm up
  times = {1: [], new_tokens: []}
  for _ in range(repeats):
    for n in times:
      t0 = time.perf_counter()
      run(n)
      times[n].append(time.perf_counter() - t0)
  t1, tn = statistics.median(times[1]), statistics.median(times[new_tokens])
  return t1, batch * (new_tokens - 1) / (tn - t1)


def in_fresh_process(*args) -> tuple[float, float]:
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
    return pool.submit(measure, *args).result()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--hf_threads", nargs="+", type=int, default=[1, 2],
                      help="torch thread counts to try (2 threads collapse when other processes load the CPUs)")
  args = parser.parse_args(argv)

  import jax
  import torch
  import transformers
  gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
  # No jax.devices() here: it would take the GPU's memory from the measuring processes.
  print(f"# {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, {gpu}), jax {jax.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, greedy, float32, median of {args.repeats}; HF: the faster of "
        f"{' and '.join(map(str, args.hf_threads))} torch threads\n")
  print("| model | batch | mimix_jax TTFT (ms) | HF TTFT (ms) | mimix_jax decode (tok/s) | HF decode (tok/s) "
        "| HF threads | decode speed-up |")
  print("|---|---|---|---|---|---|---|---|")
  common = (args.prompt_len, args.new_tokens, args.repeats)
  for name in args.presets:
    for batch in args.batches:
      jt, jr = in_fresh_process("jax", name, batch, *common)
      hf = {t: in_fresh_process("hf", name, batch, *common, t) for t in args.hf_threads}
      threads = max(hf, key=lambda t: hf[t][1])
      ht, hr = hf[threads]
      print(f"| {name} | {batch} | {jt * 1e3:.0f} | {ht * 1e3:.0f} | {jr:.1f} | {hr:.1f} | {threads} "
            f"| {jr / hr:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
