"""Memory and FLOP planner: compiles the real train step for the configured mesh without allocating it.

`python -m mimix_jax.train --config configs/gpt_large.py:pretrain --dry_run` (8 virtual CPU devices by default).
The per-device numbers come from XLA's buffer assignment for the compiled step (params, optimizer state,
batch, activations and temporaries); a GPU build differs somewhat (other fusions, cuDNN workspaces).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimix_jax import config as config_lib, sharding, trainer as trainer_lib

GiB = 1024**3


def abstract_batch(cfg: ml_collections.ConfigDict, trainer: trainer_lib.Trainer):
  """ShapeDtypeStructs of one step's global batch [A, B/A, (2,) T] and the DPO extra input."""
  micro = cfg.batch_size // cfg.grad_accum_steps
  pair = (2,) if cfg.stage == "dpo" else ()
  shape = (cfg.grad_accum_steps, micro, *pair, cfg.max_len)
  sh = trainer.batch_sharding(len(shape) - 1, accumulate=True)
  dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
            "positions": jnp.int32}
  batch = {k: jax.ShapeDtypeStruct(shape, d, sharding=sh) for k, d in dtypes.items()}
  extra = None
  if cfg.stage == "dpo":
    extra = jax.ShapeDtypeStruct((cfg.grad_accum_steps, micro, 2), jnp.float32,
                                 sharding=trainer.batch_sharding(2, accumulate=True))
  return batch, extra


def plan(cfg: ml_collections.ConfigDict) -> dict:
  model_cfg = config_lib.model_config(cfg)
  mesh = sharding.make_mesh(**cfg.mesh)
  trainer = trainer_lib.build(cfg, model_cfg, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       trainer.abstract_state, trainer.state_shardings)
  batch, extra = abstract_batch(cfg, trainer)
  t0 = time.perf_counter()
  with sharding.activate(mesh):
    compiled = trainer.train_step().lower(state, batch, extra).compile()
  mem = compiled.memory_analysis()
  n_dev = mesh.size
  state_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state))
  tokens = cfg.batch_size * cfg.max_len * (2 if cfg.stage == "dpo" else 1)
  out = {
      "stage": cfg.stage, "mesh": dict(mesh.shape), "devices": n_dev,
      "params": model_cfg.param_count(), "params_padded": model_cfg.param_count(padded=True),
      "vocab_size": model_cfg.vocab_size, "padded_vocab_size": model_cfg.padded_vocab_size,
      "flops_per_token": model_cfg.flops_per_token(cfg.max_len), "tokens_per_step": tokens,
      "flops_per_step": model_cfg.flops_per_token(cfg.max_len) * tokens,
      "state_bytes_total": int(state_bytes), "compile_seconds": round(time.perf_counter() - t0, 1),
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
  print(f"stage {p['stage']}  mesh {p['mesh']}  ({p['devices']} devices)")
  print(f"parameters: {p['params']:,} at vocab {p['vocab_size']} (reference-comparable); "
        f"{p['params_padded']:,} with the vocabulary padded to {p['padded_vocab_size']}")
  print(f"FLOPs per token: {p['flops_per_token'] / 1e9:.3f} GFLOP (training, PaLM convention: 6N + 12*L*T*d_attn, "
        f"causal attention not halved); per step: {p['flops_per_step'] / 1e15:.2f} PFLOP "
        f"({p['tokens_per_step']:,} tokens)")
  print(f"train state (fp32 params + Adam moments): {p['state_bytes_total'] / GiB:.2f} GiB in total")
  if "peak_bytes_per_device" in p:
    print(f"per device: arguments {p['argument_bytes_per_device'] / GiB:.2f} GiB, "
          f"temporaries {p['temp_bytes_per_device'] / GiB:.2f} GiB, "
          f"peak ~{p['peak_bytes_per_device'] / GiB:.2f} GiB (compiled in {p['compile_seconds']} s)")
  return p
