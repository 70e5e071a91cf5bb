"""Train-step throughput: our jitted step vs transformers' LlamaForCausalLM (PyTorch), side by side in one run.

    python bench/train_throughput.py [--shape cpu_tiny|cpu_base|gpu_large|cpu_smoke] [--steps N] [--json FILE] [--torch]

Both sides do the same work per step: forward, backward and AdamW on the same architecture (tied embeddings,
GQA, RoPE 500000, RMSNorm 1e-5, gated SiLU), batch, sequence length and dtype. Tokens/s counts the tokens of a
global step; MFU uses ModelConfig.flops_per_token (PaLM convention, causal attention not halved) over the dense
bf16 peak of the device (none on a CPU). Each side runs in its own process (XLA's and PyTorch's thread pools
starve each other in one) and the two alternate, `--steps` steps at a time (ours, torch, ours, torch...), so that
load from other processes hits both alike; the ratio compares medians.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
                     batch=2, seq=256, dtype="float32", remat="none", loss_chunk=128),
    # For the test suite's smoke run only.
    "cpu_smoke": dict(model=dict(vocab_size=500, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                                 scan_layers=False, attention_q_block=16),
                      batch=2, seq=64, dtype="float32", remat="none", loss_chunk=16),
    # gpt_large's remat policy: without it batch 16 x 1024 needs ~72 GiB, more than JAX takes of an 80 GB card.
    "gpu_large": dict(model=dict(vocab_size=50256, n_layers=24, d_model=1024, n_heads=8, n_kv_heads=4, d_ff=3072),
                      batch=16, seq=1024, dtype="bfloat16", remat="save_dots", loss_chunk=256),
}


def jax_runner(shape: dict, batch: int, attention: str, remat: str, loss_chunk: int, scan_layers: bool | None,
               q_block: int | None = None):
  """Returns step() -> the new train state (blocking) for our train step on all local devices, and the ModelConfig."""
  import jax
  import numpy as np
  from mimix_jax.model import sharding
  from mimix_jax.training import config as config_lib, objectives
  from mimix_jax.training.step import TrainStep

  cfg = config_lib.defaults()
  cfg.model.update(**shape["model"], dtype=shape["dtype"], remat=remat, attention=attention, vocab_multiple=128)
  if scan_layers is not None:
    cfg.model.scan_layers = scan_layers
  if q_block is not None:
    cfg.model.attention_q_block = q_block
  cfg.update(max_len=shape["seq"], batch_size=batch, total_steps=1000, loss_chunk=loss_chunk)
  mesh = sharding.make_mesh(1, -1, 1)
  tr = TrainStep(cfg, objectives.from_config(cfg), mesh)
  rng = np.random.default_rng(0)
  b, t = batch, shape["seq"]
  local = {"inputs": rng.integers(0, shape["model"]["vocab_size"], (b, t), dtype=np.int32),
           "targets": rng.integers(0, shape["model"]["vocab_size"], (b, t), dtype=np.int32),
           "loss_mask": np.ones((b, t), np.float32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
           # As in training, where rows pack documents: the fused kernel gets a mask, not its mask-free causal case.
           "segment_ids": np.ones((b, t), np.int32)}
  with sharding.activate(mesh):
    state = tr.init_state(0)
    device_batch = tr.device_batch(local)
  holder = {"state": state}

  def step():
    with sharding.activate(mesh):
      holder["state"], metrics = tr(holder["state"], device_batch)
    jax.block_until_ready(metrics["loss"])
    return holder["state"]

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


def serve(conn, side: str, shape_name: str, batch: int, opts: dict) -> None:
  """A worker process: builds one side's step, warms it up, then times n steps per request (0 ends it).

  Sends a dict of facts about the side first, the step times per request, and its peak device memory last.
  """
  shape = SHAPES[shape_name]
  if side == "torch":
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    step = torch_runner(shape, batch)
    step()  # warm-up
    conn.send({"torch": torch.__version__, "transformers": transformers.__version__})
  else:
    import jax
    from mimix_jax.training.metrics import peak_flops_per_device
    step, model_cfg = jax_runner(shape, batch, **opts)
    t0 = time.perf_counter()
    step()  # compile
    conn.send({"scan_layers": model_cfg.scan_layers, "attention_q_block": model_cfg.attention_q_block,
               "n_dev": jax.device_count(), "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
               "jax": jax.__version__, "compile_s": round(time.perf_counter() - t0, 2),
               "flops_per_token": model_cfg.flops_per_token(shape["seq"]), "peak_flops": peak_flops_per_device()})
  while n := conn.recv():
    conn.send(timed(step, n))
  stats = (jax.devices()[0].memory_stats() or {}) if side == "jax" else {}  # None on CPU
  conn.send(stats.get("peak_bytes_in_use"))


def start(side: str, *args):
  """(process, connection) of a fresh worker once it has compiled / warmed up, and the facts it sent."""
  parent, child = multiprocessing.get_context("spawn").Pipe()
  proc = multiprocessing.get_context("spawn").Process(target=serve, args=(child, side, *args), daemon=True)
  proc.start()
  child.close()  # so that recv raises EOFError if the worker dies (an OOM, say) instead of waiting forever
  return proc, parent, parent.recv()


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
  loss_chunk = shape["loss_chunk"] if args.loss_chunk is None else args.loss_chunk
  remat = args.remat or shape["remat"]
  opts = dict(attention=args.attention, remat=remat, loss_chunk=loss_chunk, scan_layers=args.scan_layers,
              q_block=args.attention_q_block)

  # One at a time, so that neither compiles while the other warms up.
  sides = {"jax": start("jax", args.shape, batch, opts)}
  if with_torch:
    sides["torch"] = start("torch", args.shape, batch, opts)
  times = {side: [] for side in sides}
  for _ in range(args.rounds):
    for side, (_, conn, _) in sides.items():
      conn.send(args.steps)
      times[side] += conn.recv()
  for _, conn, _ in sides.values():
    conn.send(0)
  last = {side: conn.recv() for side, (_, conn, _) in sides.items()}  # each worker's peak device memory
  peak_bytes = last["jax"]  # None on a CPU
  for proc, *_ in sides.values():
    proc.join()

  info = sides["jax"][2]
  tokens = batch * shape["seq"]
  step_s = statistics.median(times["jax"])
  result = {
      "bench": "train_step", "shape": args.shape, "batch": batch, "seq": shape["seq"], "dtype": shape["dtype"],
      "attention": args.attention, "remat": remat, "loss_chunk": loss_chunk, "scan_layers": info["scan_layers"],
      "attention_q_block": info["attention_q_block"], "device": info["device"], "jax": info["jax"],
      "python": platform.python_version(), "compile_s": info["compile_s"],
      "step_s": step_s, "tokens_per_sec": tokens / step_s, "tokens_per_sec_per_device": tokens / step_s / info["n_dev"],
  }
  if info["peak_flops"]:
    result["mfu"] = info["flops_per_token"] * result["tokens_per_sec"] / (info["peak_flops"] * info["n_dev"])
  if with_torch:
    torch_s = statistics.median(times["torch"])
    result.update(torch_step_s=torch_s, torch_tokens_per_sec=tokens / torch_s, **sides["torch"][2])
    result["speedup_vs_torch"] = result["tokens_per_sec"] / result["torch_tokens_per_sec"]
  if peak_bytes:
    result["peak_memory_gib"] = peak_bytes / 2**30
  emit(result, args.json)
  return 0


def emit(result: dict, json_path: str | None) -> None:
  """Prints the result as one JSON line and appends it to json_path (when given)."""
  print(json.dumps(result), flush=True)
  if json_path:
    with open(json_path, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  sys.exit(main())
