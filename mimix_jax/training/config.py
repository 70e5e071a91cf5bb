"""Training configuration: the defaults every config file starts from, and how config files are loaded.

A config file (configs/*.py) defines `get_config(stage)` returning an `ml_collections.ConfigDict` for one stage
of its recipe (e.g. `pretrain_2048`); it reads like a table of hyper-parameters on top of `defaults()`. The
stage sets `objective` (what is optimised: pretrain | sft | dpo, training/objectives.py) among the rest. On the
command line: `--config configs/tiny.py:pretrain --config.optimizer.lr=3e-4`. ConfigDicts are locked, so a
misspelt field fails loudly instead of being silently added.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from mimix_jax.model.config import ModelConfig, preset
from mimix_jax.training import objectives


def model_fields(model: ModelConfig) -> ml_collections.ConfigDict:
  """A preset's fields for `c.model`, all but max_len: the stage's `max_len` sets the model's.

  head_dim stays 0 (derived) where it is d_model / n_heads, so an override of d_model or n_heads carries through.
  """
  fields = model.to_dict()
  del fields["max_len"]
  if model.head_dim * model.n_heads == model.d_model:
    fields["head_dim"] = 0
  return ml_collections.ConfigDict(fields)


def optimizer_defaults() -> ml_collections.ConfigDict:
  """`c.optimizer`: the optimizer, its schedule and clipping (training/optimizer.py; README "Optimizer")."""
  o = ml_collections.ConfigDict()
  o.name = "adamw"  # adamw | muon (Muon for the layers' projection matrices, AdamW for the rest)
  o.lr = 1e-3  # AdamW's peak lr (with muon: for the embedding, norms and the rest)
  o.schedule = "cosine"  # cosine | linear | constant | wsd, all after a linear warmup
  o.warmup_steps = 10
  o.min_lr_ratio = 0.1  # floor of cosine/linear/wsd decay as a fraction of the peak lr
  o.decay_fraction = 0.2  # wsd: the last fraction of total_steps decays linearly to the floor
  o.muon_lr = 0.02  # Muon's peak lr, on the same schedule (its updates are orthogonalised: ~unit scale)
  o.muon_momentum = 0.95  # Muon's Nesterov momentum
  o.muon_weight_decay = 0.0  # decoupled like AdamW's: w -= muon_lr(t) * (update + decay * w)
  o.muon_ns_steps = 5  # Newton-Schulz iterations per update
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.01
  o.decay_norms_and_embeddings = False  # the original decays everything; we don't by default
  o.clip_norm = 1.0  # global-norm clipping; 0 disables (the original's runs had none)
  o.z_loss = 0.0  # weight of mean(logsumexp^2); 0 disables
  return o


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.objective = "pretrain"  # what is optimised: pretrain | sft | dpo (training/objectives.py)
  c.seed = 0  # every random choice (init, data order, dropout-free sampling) derives from this
  c.model = model_fields(preset("tiny"))
  c.max_len = preset("tiny").max_len  # training sequence length, and the model's context
  c.batch_size = 8  # global, in sequences (pairs for DPO), per optimizer step
  c.grad_accum_steps = 1  # micro-batches per step; batch_size must divide by it
  c.loss_chunk = 0  # positions per cross-entropy chunk (bounds [B, chunk, V] logits memory); 0 = all at once
  c.total_steps = 100
  c.tokenizer_path = ""
  c.init_from = ""  # run dir or checkpoint step dir: load params only, new optimizer

  c.data = ml_collections.ConfigDict()
  c.data.train_path = ""
  c.data.eval_path = ""
  c.data.worker_count = 0  # grain worker processes (0 = in the main process)
  c.data.prefetch = 2  # batches sent to the devices ahead of the step that trains on them (0 = none ahead)

  c.optimizer = optimizer_defaults()

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1 takes the remaining devices

  c.log_every = 10
  c.eval_every = 0  # 0 = no periodic eval
  c.eval_steps = 10
  # Benchmark tasks scored as lm-evaluation-harness does (mimix_jax/evaluation), every eval_tasks_every steps and
  # at the end, into eval.jsonl (tasks/NAME/acc, tasks/NAME/acc_norm, tasks/core), TensorBoard and loss.png.
  c.eval_tasks = ""  # comma-separated, e.g. "hellaswag,arc_easy,piqa"; "" = none
  c.eval_task_dir = ""  # local task files (evaluate --task_dir); "" = the hub through `datasets`
  c.eval_tasks_every = 0  # 0 = only at the end
  c.eval_tasks_fewshot = 0
  c.eval_tasks_limit = 0  # the first N examples of each task; 0 = all
  c.save_every_steps = 100
  c.keep_checkpoints = 2  # the last N checkpoints ...
  c.keep_every = 0  # ... plus every K-th step (0 = none)
  c.max_nonfinite_steps = 5  # stop after this many consecutive non-finite losses/gradients

  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"  # sigmoid | ipo
  c.dpo.label_smoothing = 0.0  # cDPO
  # loss = dpo_weight * DPO + sft_weight * SFT(chosen). The original: dpo_weight 0.1, sft_weight 1 (sft + 0.1 dpo);
  # TRL's RPO: dpo_weight 1, sft_weight alpha; plain DPO: 1, 0.
  c.dpo.dpo_weight = 1.0
  c.dpo.sft_weight = 0.0
  return c


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig a run trains, with the sequence length of this stage."""
  return ModelConfig.from_dict({**cfg.model.to_dict(), "max_len": cfg.max_len})


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py:stage` and applies `field.sub=value` overrides (for tests and tools)."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise FileNotFoundError(f"config file {path} does not exist (expected FILE.py:STAGE, e.g. configs/tiny.py:pretrain)")
  module_spec = importlib.util.spec_from_file_location("_mimix_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    key, _, value = item.removeprefix("--config.").partition("=")
    apply_override(cfg, key, value)
  return cfg


def apply_override(cfg: ml_collections.ConfigDict, key: str, value: str) -> None:
  *parents, leaf = key.split(".")
  node = cfg
  for name in parents:
    if name not in node:
      raise KeyError(f"config has no field {key!r} (no {name!r})")
    node = node[name]
  if leaf not in node:
    raise KeyError(f"config has no field {key!r}; did you mean one of {sorted(node.keys())}?")
  old = node[leaf]
  node[leaf] = _parse_like(old, value, key)


def _parse_like(old: Any, value: str, key: str) -> Any:
  kinds = [(bool, "a boolean (true / false)", _boolean), (int, "an integer", int), (float, "a number", float)]
  for kind, name, parse in kinds:
    if isinstance(old, kind):
      try:
        return parse(value)
      except ValueError:
        raise ValueError(f"--config.{key}: expected {name}, got {value!r}") from None
  return value


def _boolean(value: str) -> bool:
  if value.lower() in ("true", "1", "yes"):
    return True
  if value.lower() in ("false", "0", "no"):
    return False
  raise ValueError(value)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Refuses impossible settings with one clear line each."""
  objectives.from_config(cfg)  # checks the objective's own fields
  if cfg.grad_accum_steps < 1 or cfg.batch_size % cfg.grad_accum_steps:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by grad_accum_steps {cfg.grad_accum_steps}")
  if cfg.data.prefetch < 0:
    raise ValueError(f"data.prefetch must be >= 0, got {cfg.data.prefetch}")
  model_config(cfg)  # raises on inconsistent model dims
