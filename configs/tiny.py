"""The pipeline at CPU size: a 2.4M-parameter model, used by `make demo` and the tests.

Same stages and hand-over as gpt_large.py; seconds per stage on a 2-core CPU.
"""

from mimix_jax.model.config import preset
from mimix_jax.training import config as base

STAGES = ("pretrain", "pretrain_2048", "sft", "dpo")


def get_config(stage="pretrain"):
  c = base.defaults()
  c.model = base.model_fields(preset("tiny", dtype="float32", scan_layers=False))
  c.model.vocab_size = 0  # the tokenizer's (make demo trains 4096 ids)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.tokenizer_path = "demo_out/tokenizer"
  c.log_every = 5
  c.save_every_steps = 50

  #                     objective  max_len batch steps  lr     warmup  data
  if stage == "pretrain":
    c.update(objective="pretrain", max_len=128, batch_size=16, total_steps=150)
    c.optimizer.update(lr=2e-3, warmup_steps=20)
    c.data.train_path = "demo_out/data/pretrain_128"
  elif stage == "pretrain_2048":  # the length-extension stage, at CPU size: 128 -> 256
    c.update(objective="pretrain", max_len=256, batch_size=8, total_steps=30, init_from="demo_out/runs/pretrain")
    c.optimizer.update(lr=5e-4, warmup_steps=10)
    c.data.train_path = "demo_out/data/pretrain_256"
  elif stage == "sft":
    c.update(objective="sft", max_len=256, batch_size=8, total_steps=80, init_from="demo_out/runs/pretrain_2048")
    c.optimizer.update(lr=5e-4, warmup_steps=10)
    c.data.train_path = "demo_out/data/sft"
  elif stage == "dpo":
    c.update(objective="dpo", max_len=128, batch_size=8, total_steps=40, init_from="demo_out/runs/sft")
    c.optimizer.update(lr=1e-3, warmup_steps=5)
    c.data.train_path = "demo_out/data/dpo"
    c.dpo.update(beta=0.1, dpo_weight=1.0, sft_weight=0.1)  # RPO weighting
  else:
    raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
  c.lock()
  return c
