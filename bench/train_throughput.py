"""Train-step throughput: our jitted step vs transformers' LlamaForCausalLM (PyTorch), side by side in one run.

    python bench/train_throughput.py [--shape cpu_tiny|cpu_base|gpu_large] [--steps N] [--json FILE] [--torch]

Both sides do the same work per step: forward, backward and AdamW on the same architecture (tied embeddings,
GQA, RoPE 500000, RMSNorm 1e-5, gated SiLU), batch, sequence length and dtype. Tokens/s counts the tokens of a
global step; MFU uses ModelConfig.flops_per_token (PaLM convention, causal attention not halved) over the dense
bf16 peak of the device (none on a CPU). The two runs alternate (ours, torch, ours, torch...) so that load from
other processes hits both alike, and the ratio compares medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # The CPU reference shape: 4 layers, d_model 256, vocab 8000, batch 8 x 256, float32.
    "cpu_tiny": dict(model=dict(vocab_size=8000, n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, d_ff=768,
                                scan_layers=False),
                     batch=8, seq=256, dtype="float32", remat="none", loss_chunk=32),
    "cpu_base": dict(model=dict(vocab_size=50256, n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, d_ff=2304,
                                scan_layers=False),
                     batch=2, seq=256, dtype="float32", remat="none", loss_chunk=32),
    "gpu_large": dict(model=dict(vocab_size=50256, n_layers=24, d_model=1024, n_heads=8, n_kv_heads=4, d_ff=3072),
                      batch=16, seq=1024, dtype="bfloat16", remat="none", loss_chunk=256),
}


def jax_runner(shape: dict, batch: int, attention: str, remat: str, loss_chunk: int, scan_layers: bool | None,
               q_block: int | None = None):
  """Returns step() -> None (blocking) for our train step on all local devices."""
  import jax
  import numpy as np
  from mimix_jax import config as config_lib, sharding, trainer as trainer_lib

  cfg = config_lib.defaults()
  cfg.model.update(**shape["model"], dtype=shape["dtype"], remat=remat, attention=attention, vocab_multiple=128)
  if scan_layers is not None:
    cfg.model.scan_layers = scan_layers
  if q_block is not None:
    cfg.model.attention_q_block = q_block
  cfg.update(max_len=shape["seq"], batch_size=batch, total_steps=1000, loss_chunk=loss_chunk)
  mesh = sharding.make_mesh(1, -1, 1)
  tr = trainer_lib.build(cfg, config_lib.model_config(cfg), mesh)
  rng = np.random.default_rng(0)
  b, t = batch, shape["seq"]
  local = {"inputs": rng.integers(0, shape["model"]["vocab_size"], (b, t), dtype=np.int32),
           "targets": rng.integers(0, shape["model"]["vocab_size"], (b, t), dtype=np.int32),
           "loss_mask": np.ones((b, t), np.float32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
  # Rows of one document each: without segment ids the fused kernel runs its mask-free causal case.
  if attention == "xla":
    local["segment_ids"] = np.ones((b, t), np.int32)
  with sharding.activate(mesh):
    state = tr.init_state(0)
    step_fn = tr.train_step()
    device_batch = tr.device_batch(local)
  holder = {"state": state}

  def step():
    with sharding.activate(mesh):
      holder["state"], metrics = step_fn(holder["state"], device_batch, None)
    jax.block_until_ready(metrics["loss"])

  return step, tr.model_cfg


def torch_runner(shape: dict, batch: int):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  m = shape["model"]
  config = LlamaConfig(vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["d_ff"],
                       num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"],
                       num_key_value_heads=m["n_kv_heads"], max_position_embeddings=shape["seq"],
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, attention_bias=False,
                       mlp_bias=False, hidden_act="silu")
  dtype = torch.float32 if shape["dtype"] == "float32" else torch.bfloat16
  model = LlamaForCausalLM(config).to(dtype)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  ids = torch.randint(0, m["vocab_size"], (batch, shape["seq"] + 1))

  def step():
    out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return step


def timed(step, n: int) -> list[float]:
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return times


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="cpu_tiny", choices=sorted(SHAPES))
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the shape's)")
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours / torch")
  p.add_argument("--attention", default="xla", choices=["xla", "fused", "cudnn"])
  p.add_argument("--remat", default=None)
  p.add_argument("--loss_chunk", type=int, default=None, help="positions per cross-entropy chunk (default: the shape's)")
  p.add_argument("--attention_q_block", type=int, default=None, help="xla attention's query block (default: the model's)")
  p.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=None,
                 help="layers under lax.scan or unrolled (default: the shape's)")
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                 help="also time PyTorch (default: on for CPU shapes)")
  p.add_argument("--json", default=None, help="append one JSON line with the result here")
  args = p.parse_args(argv)
  shape = SHAPES[args.shape]
  batch = args.batch or shape["batch"]
  with_torch = args.shape.startswith("cpu") if args.torch is None else args.torch
  if with_torch:
    import torch
    torch.set_num_threads(os.cpu_count())

  import jax
  from mimix_jax.metrics import peak_flops_per_device
  loss_chunk = shape["loss_chunk"] if args.loss_chunk is None else args.loss_chunk
  ours, model_cfg = jax_runner(shape, batch, args.attention, args.remat or shape["remat"], loss_chunk,
                                args.scan_layers, args.attention_q_block)
  t0 = time.perf_counter()
  ours()  # compile
  compile_s = time.perf_counter() - t0
  theirs = torch_runner(shape, batch) if with_torch else None
  if theirs:
    theirs()  # warm-up
  ours_t, theirs_t = [], []
  for _ in range(args.rounds):
    ours_t += timed(ours, args.steps)
    if theirs:
      theirs_t += timed(theirs, args.steps)

  tokens = batch * shape["seq"]
  n_dev = jax.device_count()
  result = {
      "bench": "train_step", "shape": args.shape, "batch": batch, "seq": shape["seq"], "dtype": shape["dtype"],
      "attention": args.attention, "remat": args.remat or shape["remat"], "loss_chunk": loss_chunk,
      "scan_layers": model_cfg.scan_layers, "attention_q_block": model_cfg.attention_q_block,
      "device": f"{n_dev} x {jax.devices()[0].device_kind}", "jax": jax.__version__,
      "python": platform.python_version(), "compile_s": round(compile_s, 2),
      "step_s": statistics.median(ours_t), "tokens_per_sec": tokens / statistics.median(ours_t),
  }
  result["tokens_per_sec_per_device"] = result["tokens_per_sec"] / n_dev
  peak = peak_flops_per_device()
  if peak:
    result["mfu"] = model_cfg.flops_per_token(shape["seq"]) * result["tokens_per_sec"] / (peak * n_dev)
  if theirs_t:
    import torch
    import transformers
    result.update(torch_step_s=statistics.median(theirs_t), torch_tokens_per_sec=tokens / statistics.median(theirs_t),
                  torch=torch.__version__, transformers=transformers.__version__)
    result["speedup_vs_torch"] = result["tokens_per_sec"] / result["torch_tokens_per_sec"]
  stats = jax.devices()[0].memory_stats() or {}  # None on CPU
  if "peak_bytes_in_use" in stats:
    result["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
  print(json.dumps(result), flush=True)
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(result) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
