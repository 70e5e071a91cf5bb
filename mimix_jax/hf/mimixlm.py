"""Reading the original MimixLM's model folder (spec §2): model_config.json as our ModelConfig and generation
settings, model_weights* (torch state dicts in its naming) as Hugging Face Llama tensor names, so import_hf
converts them as it converts a Llama checkpoint. torch is needed only here, to read the torch files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mimix_jax.hf import layout
from mimix_jax.hf.configs import UnsupportedConfig
from mimix_jax.model.config import ModelConfig

CONFIG_FILE = "model_config.json"
WEIGHTS_PREFIX = "model_weights"
# Model options the presets never change (spec §1.6): any other value is an architecture we do not have.
FIXED = {"share_emb_out_proj": True, "activation": "swish", "use_glu": True, "layer_norm_type": "rms_norm",
         "use_pre_norm": True, "attn_pos_embedding_type": "rope", "use_attention_bias": False,
         "use_ffn_bias": False, "use_output_bias": False, "norm_before_pred": True, "lora_rank": None,
         "factorized_embedding_size": None, "layer_scale": None, "use_absolute_pos_embedding": False,
         "embedding_scale": None, "norm_after_embedding": False}
# The original's names -> the HF layout's (per-layer ones with {i}; the RoPE buffer is recomputed, not read).
TO_HF = {layout.MIMIXLM_EMBED: layout.HF_EMBED, layout.MIMIXLM_FINAL_NORM: layout.HF_FINAL_NORM,
         **{layout.MIMIXLM_LAYER_NAMES[k]: layout.HF_LAYER_NAMES[k] for k in layout.MIMIXLM_LAYER_NAMES}}


def read_config(folder: Path) -> dict[str, Any]:
  path = folder / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{folder}: no {CONFIG_FILE} (not a MimixLM model folder)")
  config = json.loads(path.read_text(encoding="utf-8"))
  for key in ("model_config", "tokenizer_config"):
    if key not in config:
      raise UnsupportedConfig(f"{path}: no {key!r} section (the original's model folder has model_config, "
                              "tokenizer_config and generation_config)")
  return config


def model_config(config: dict[str, Any]) -> ModelConfig:
  """model_config.json's model_config -> ModelConfig; the first field we cannot represent is named."""
  mc = config["model_config"]
  for field, want in FIXED.items():
    if field in mc and mc[field] != want and not (field == "share_emb_out_proj" and mc[field] is None):
      raise UnsupportedConfig(f"model_config.{field}={mc[field]!r} is not supported: need {want!r}")
  try:
    return ModelConfig(
        vocab_size=mc["vocab_size"], n_layers=mc["n_layers"], d_model=mc["d_model"], n_heads=mc["n_heads"],
        n_kv_heads=mc.get("n_kv_heads") or mc["n_heads"], d_ff=mc["d_ff"], max_len=mc["max_len"],
        rope_base=float(mc.get("attn_pos_embedding_base", 500000.0)),  # the original's default (spec §1.4)
        norm_eps=float(mc.get("ln_eps", 1e-5)))
  except KeyError as e:
    raise UnsupportedConfig(f"model_config.{e.args[0]}: required field missing from {CONFIG_FILE}") from None


def generation(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  """The run's generation settings from generation_config (and model_config's eos_id, the original's one stop)."""
  gc = config.get("generation_config", {})
  gen = dict(defaults)
  names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_decode_steps": "max_new_tokens",
           "system_message": "system_message", "generation_mode": "mode"}
  for theirs, ours in names.items():
    if gc.get(theirs) is not None:
      gen[ours] = gc[theirs]
  gen["top_k"] = gen.get("top_k") or 0
  eos = config["model_config"].get("eos_id")
  gen["stop_ids"] = [eos] if eos is not None else []
  return gen


def read_weights(folder: Path) -> dict[str, np.ndarray]:
  """Every model_weights* file (DeepSpeed's "module." prefix dropped) as float32 NumPy in Hugging Face names."""
  try:
    import torch
  except ImportError:
    raise RuntimeError("--format mimixlm reads torch state dicts and needs torch (pip install -e '.[torch]')")
  files = sorted(p for p in folder.iterdir() if p.name.startswith(WEIGHTS_PREFIX))
  if not files:
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_PREFIX}* files")
  tensors = {}
  for path in files:
    for key, t in torch.load(path, map_location="cpu", weights_only=True).items():
      key = key.removeprefix("module.")
      if key == layout.MIMIXLM_ROPE:
        continue
      tensors[_hf_name(key)] = t.float().numpy()
  return tensors


def _hf_name(key: str) -> str:
  """A MimixLM tensor name -> the Hugging Face one (per-layer names matched through their {i} template)."""
  if key in TO_HF:
    return TO_HF[key]
  parts = key.split(".")
  for i, p in enumerate(parts):
    if p.isdigit():
      template = ".".join([*parts[:i], "{i}", *parts[i + 1 :]])
      if template in TO_HF:
        return TO_HF[template].format(i=p)
  return key  # an unknown tensor: from_hf_state_dict refuses it by name
