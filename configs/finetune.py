"""Fine-tune an imported (or any) run: SFT, then DPO, with the run's own architecture and tokenizer.

    python -m mimix_jax.train --config configs/finetune.py:sft:RUN --workdir RUN_SFT --config.data.train_path=SHARDS
    python -m mimix_jax.train --config configs/finetune.py:dpo:RUN_SFT --workdir RUN_DPO --config.data.train_path=...

RUN is a run directory (python -m mimix_jax.import_hf makes one from a Hugging Face checkpoint): the model fields
come from its model.json and the stage starts from its params (init_from), so no architecture override is needed.
RUN may also be a model preset name (smollm2_360m, llama3_2_1b, ...) to plan memory with --dry_run before any
download. Sizes are for one 8-GPU node: bf16 compute, FSDP over all devices, activations rematerialised.
"""

from pathlib import Path

from mimix_jax.model.config import PRESETS, preset
from mimix_jax.training import config as base, run_dir

#          objective  max_len  batch  steps  lr     warmup  grad_accum
STAGES = {
    "sft": dict(objective="sft", max_len=2048, batch_size=64, total_steps=2000, lr=2e-5, warmup=100, accum=4),
    "dpo": dict(objective="dpo", max_len=2048, batch_size=32, total_steps=1000, lr=5e-7, warmup=50, accum=4),
}


def get_config(arg="sft:"):
  stage, _, source = arg.partition(":")
  if stage not in STAGES or not source:
    raise ValueError(f"expected configs/finetune.py:STAGE:RUN with STAGE one of {', '.join(STAGES)}, got {arg!r}")
  s = STAGES[stage]
  c = base.defaults()
  if source in PRESETS:
    c.model = base.model_fields(preset(source))
    c.model.vocab_size = PRESETS[source]["vocab_size"]
  else:
    c.model = base.model_fields(run_dir.read_run_info(Path(source)).model)
    c.init_from = source  # its tokenizer too
  c.model.update(dtype="bfloat16", remat="full", scan_layers=True)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.update(objective=s["objective"], max_len=s["max_len"], batch_size=s["batch_size"], total_steps=s["total_steps"],
           grad_accum_steps=s["accum"], loss_chunk=256)
  c.optimizer.update(lr=s["lr"], warmup_steps=s["warmup"], weight_decay=0.0, schedule="cosine", min_lr_ratio=0.1)
  c.dpo.update(beta=0.1, dpo_weight=1.0, sft_weight=0.0)
  c.log_every = 10
  c.save_every_steps = 500
  c.lock()
  return c
