"""The gpt_large recipe at CPU size, for `launch/gpt_large/run_all.sh --rehearse`: the same stages, objectives,
hand-over (init_from), DPO weighting and schedules as gpt_large.py, with a tiny model and a few steps each.

What shrinks is listed here; everything else is gpt_large.py's. The launch scripts pass the data, tokenizer and
init_from paths under --root.
"""

import importlib.util
from pathlib import Path

from mimix_jax.model.config import preset
from mimix_jax.training import config as base

_spec = importlib.util.spec_from_file_location("gpt_large", Path(__file__).with_name("gpt_large.py"))
gpt_large = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpt_large)
STAGES = gpt_large.STAGES

#              max_len batch steps   (gpt_large: 1024/2048, 1200/600/600/32, 100k/12k/85k/5.7k)
SIZES = {
    "pretrain": (64, 8, 40),
    "pretrain_2048": (128, 4, 10),
    "sft": (128, 4, 16),
    "dpo": (128, 4, 8),
}


def get_config(stage="pretrain"):
  c = gpt_large.get_config(stage)
  max_len, batch, steps = SIZES[stage]
  c.model = base.model_fields(preset("tiny", dtype="float32", scan_layers=False))
  c.model.vocab_size = 0  # the rehearsal's tokenizer's
  c.update(max_len=max_len, batch_size=batch, total_steps=steps, grad_accum_steps=1, loss_chunk=0,
           log_every=2, save_every_steps=4, keep_every=0)
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps // 4)
  return c
