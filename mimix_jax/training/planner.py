"""Memory and FLOP planner: compiles the real train step for the configured mesh without allocating it.

`python -m mimix_jax.train --config configs/gpt_large.py:pretrain --dry_run` (8 virtual CPU devices by default).
The per-device numbers come from XLA's buffer assignment for the compiled step (params, optimizer state,
batch, activations and temporaries); a GPU build differs somewhat (other fusions, cuDNN workspaces).
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from mimix_jax.model import sharding
from mimix_jax.training import objectives, optimizer
from mimix_jax.training.step import TrainStep

GiB = 1024**3


def plan(cfg: ml_collections.ConfigDict) -> dict:
  mesh = sharding.make_mesh(**cfg.mesh)
  step = TrainStep(cfg, objectives.from_config(cfg), mesh)
  model_cfg = step.model_cfg
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       step.abstract_state, step.state_shardings)
  t0 = time.perf_counter()
  with sharding.activate(mesh):
    compiled = step.lower(state, step.abstract_batch()).compile()
  mem = compiled.memory_analysis()
  nbytes = lambda tree: int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))
  flops_per_token = model_cfg.flops_per_token(cfg.max_len)
  out = {
      "objective": cfg.objective, "mesh": dict(mesh.shape), "devices": mesh.size,
      "params": model_cfg.param_count(), "params_padded": model_cfg.param_count(padded=True),
      "vocab_size": model_cfg.vocab_size, "padded_vocab_size": model_cfg.padded_vocab_size,
      "flops_per_token": flops_per_token, "tokens_per_step": step.tokens_per_step,
      "flops_per_step": flops_per_token * step.tokens_per_step,
      "optimizer": cfg.optimizer.name, "param_bytes_total": nbytes(step.abstract_state["params"]),
      "opt_state_bytes_total": nbytes(step.abstract_state["opt_state"]),
      "state_bytes_total": nbytes(step.abstract_state), "compile_seconds": round(time.perf_counter() - t0, 1),
  }
  if mem is not None:
    out.update(
        argument_bytes_per_device=int(mem.argument_size_in_bytes), output_bytes_per_device=int(mem.output_size_in_bytes),
        temp_bytes_per_device=int(mem.temp_size_in_bytes), alias_bytes_per_device=int(mem.alias_size_in_bytes),
        peak_bytes_per_device=int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                                  - mem.alias_size_in_bytes))
  return out


def report(cfg: ml_collections.ConfigDict) -> dict:
  p = plan(cfg)
  print(f"objective {p['objective']}  mesh {p['mesh']}  ({p['devices']} devices)")
  print(f"parameters: {p['params']:,} at vocab {p['vocab_size']} (reference-comparable); "
        f"{p['params_padded']:,} with the vocabulary padded to {p['padded_vocab_size']}")
  print(f"FLOPs per token: {p['flops_per_token'] / 1e9:.3f} GFLOP (training, PaLM convention: 6N + 12*L*T*d_attn, "
        f"causal attention not halved); per step: {p['flops_per_step'] / 1e15:.2f} PFLOP "
        f"({p['tokens_per_step']:,} tokens)")
  print(f"train state: {p['state_bytes_total'] / GiB:.2f} GiB in total: fp32 params {p['param_bytes_total'] / GiB:.2f} "
        f"GiB + {p['optimizer']} state {p['opt_state_bytes_total'] / GiB:.2f} GiB "
        f"({optimizer.STATE_PER_PARAM[p['optimizer']]})")
  if "peak_bytes_per_device" in p:
    print(f"per device: arguments {p['argument_bytes_per_device'] / GiB:.2f} GiB, "
          f"temporaries {p['temp_bytes_per_device'] / GiB:.2f} GiB, "
          f"peak ~{p['peak_bytes_per_device'] / GiB:.2f} GiB (compiled in {p['compile_seconds']} s)")
  return p
