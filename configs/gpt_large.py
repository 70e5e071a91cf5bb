"""The original MimixLM gpt_large recipe on one 8-GPU node: 353.5M parameters.

Hyper-parameters are the original's; what we change on purpose is commented.
"""

from mimix_jax.model.config import preset
from mimix_jax.training import config as base

STAGES = ("pretrain", "pretrain_2048", "sft", "dpo")
# Not the original's: its pretrain stages with Muon for the layers' projection matrices (AdamW as above for the
# embedding and norms), each from the previous Muon stage. muon_lr: Muon's usual 0.02 (Keller Jordan's default),
# cut 10x for the 2048 stage as the reference cuts AdamW's. Untried at this size: a starting point, not a result.
MUON_STAGES = {"pretrain_muon": ("pretrain", 0.02), "pretrain_2048_muon": ("pretrain_2048", 2e-3)}


def get_config(stage="pretrain"):
  if stage in MUON_STAGES:
    return muon_variant(stage)
  c = base.defaults()
  c.model = base.model_fields(preset("large", dtype="bfloat16", remat="save_dots"))
  c.mesh.update(data=1, fsdp=-1, tensor=1)  # FSDP over all 8 GPUs
  c.tokenizer_path = "data/gpt_large/tokenizer"
  c.log_every = 10
  c.save_every_steps = 5000
  c.keep_every = 20000
  c.optimizer.update(weight_decay=0.01, clip_norm=1.0, schedule="cosine", min_lr_ratio=1e-4)  # clip: ours

  # 150 sequences per GPU per step do not fit at once: 5 micro-batches of 30 (planner: ~34 GiB per device).
  c.grad_accum_steps = 5
  c.loss_chunk = 256  # never materialise [30, 1024, 50304] float32 logits (6 GB per GPU)

  #                     objective  max_len batch  steps    lr     warmup
  if stage == "pretrain":
    c.update(objective="pretrain", max_len=1024, batch_size=1200, total_steps=100_000)
    c.optimizer.update(lr=5e-4, warmup_steps=1000)
    c.data.train_path = "data/gpt_large/pretrain_1024"
  elif stage == "pretrain_2048":
    c.update(objective="pretrain", max_len=2048, batch_size=600, total_steps=12_000, init_from="runs/gpt_large/pretrain")
    c.optimizer.update(lr=5e-5, warmup_steps=1000)
    c.data.train_path = "data/gpt_large/pretrain_2048"
  elif stage == "sft":
    c.update(objective="sft", max_len=2048, batch_size=600, total_steps=85_000, init_from="runs/gpt_large/pretrain_2048")
    c.optimizer.update(lr=3e-5, warmup_steps=1000)
    c.data.train_path = "data/gpt_large/sft"
    c.save_every_steps = 5000
  elif stage == "dpo":  # the original ran DPO on 1 GPU with 32 pairs; we keep the batch, use the node
    c.update(objective="dpo", max_len=2048, batch_size=32, total_steps=5_700, init_from="runs/gpt_large/sft",
             grad_accum_steps=1)
    c.optimizer.update(lr=1e-5, warmup_steps=500)
    c.data.train_path = "data/gpt_large/dpo"
    c.save_every_steps = 2000
    c.dpo.update(beta=0.1, dpo_weight=0.1, sft_weight=1.0)  # the original: loss = sft + 0.1 * dpo
  else:
    raise ValueError(f"unknown stage {stage!r}; choose from {', '.join((*STAGES, *MUON_STAGES))}")
  c.lock()
  return c


def muon_variant(stage):
  reference, muon_lr = MUON_STAGES[stage]
  c = get_config(reference)
  c.optimizer.update(name="muon", muon_lr=muon_lr)
  if c.init_from:
    c.init_from += "_muon"
  return c
