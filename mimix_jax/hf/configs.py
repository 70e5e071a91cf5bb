"""config.json for Hugging Face Llama and the original's model_config.json, from and to our ModelConfig."""

from __future__ import annotations

import dataclasses
from typing import Any

from mimix_jax.model.config import ModelConfig
from mimix_jax.model.rope import SCALING_FIELDS

# Llama-family features our model has no counterpart for: config field -> its value meaning "not used".
_ABSENT = {"sliding_window": None, "num_local_experts": None, "num_experts": None, "num_experts_per_tok": None,
           "moe_layer_freq": None, "qk_norm": False, "use_qk_norm": False, "no_rope_layers": None}


class UnsupportedConfig(ValueError):
  """A Hugging Face config (or checkpoint) this model cannot represent; the message names the field."""


def hf_config(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int, dtype: str) -> dict[str, Any]:
  """config.json for LlamaForCausalLM that transformers 4.x and 5.x both read the same way."""
  scaling = None if cfg.rope_scaling is None else dataclasses.asdict(cfg.rope_scaling)
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_positions,
      "initializer_range": cfg.init_std,
      "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "use_cache": True,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": pad_id,
      # 4.x reads rope_theta / rope_scaling / torch_dtype; 5.x reads rope_parameters / dtype (and maps the old names).
      "rope_theta": cfg.rope_base,
      "rope_scaling": None if scaling is None else {"rope_type": scaling["type"], **_params(scaling)},
      "rope_parameters": {"rope_type": "default" if scaling is None else scaling["type"], "rope_theta": cfg.rope_base,
                          **_params(scaling or {})},
      "torch_dtype": dtype,
      "dtype": dtype,
  }


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """A Llama config.json -> ModelConfig; raises UnsupportedConfig naming the first field we cannot represent.

  max_len (the context a run uses) is max_position_embeddings, the checkpoint's own context; import_hf may
  choose a shorter one.
  """
  model_type = hf.get("model_type")
  if model_type != "llama":
    raise UnsupportedConfig(f"model_type={model_type!r}: only Llama-architecture checkpoints (\"llama\") are supported")
  _require(hf, "hidden_act", "silu", default="silu", also=("swish",))
  _require(hf, "attention_bias", False, default=False)
  _require(hf, "mlp_bias", False, default=False)
  for field, absent in _ABSENT.items():
    if hf.get(field, absent) not in (absent, None):
      raise UnsupportedConfig(f"{field}={hf[field]!r} is not supported (a Llama feature our model does not have)")
  if hf.get("quantization_config"):
    raise UnsupportedConfig("quantization_config: quantized checkpoints are not supported; use a float one")
  rope_theta, scaling = _rope(hf)
  try:
    return _config(hf, rope_theta, scaling)
  except KeyError as e:
    raise UnsupportedConfig(f"{e.args[0]}: required field missing from config.json") from None
  except ValueError as e:  # ModelConfig's own checks (e.g. an odd head_dim), in its field names
    raise UnsupportedConfig(str(e)) from None


def _config(hf: dict[str, Any], rope_theta: float, scaling: dict[str, Any] | None) -> ModelConfig:
  return ModelConfig(
      vocab_size=hf["vocab_size"],
      n_layers=hf["num_hidden_layers"],
      d_model=hf["hidden_size"],
      n_heads=hf["num_attention_heads"],
      n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      d_ff=hf["intermediate_size"],
      head_dim=hf.get("head_dim") or 0,
      max_len=hf["max_position_embeddings"],
      max_position_embeddings=hf["max_position_embeddings"],
      rope_base=float(rope_theta),
      rope_scaling=scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # LlamaConfig's default is untied
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),  # LlamaConfig's default
      init_std=float(hf.get("initializer_range", 0.02)),
  )


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
  """(rope theta, our rope_scaling dict or None) from either generation of field names (5.x: rope_parameters,
  4.x: rope_theta + rope_scaling), with transformers 5's precedence: a non-empty rope_scaling wins, then the
  dict's own rope_theta. Refuses rope types other than default, linear and llama3."""
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise UnsupportedConfig(f"partial_rotary_factor={hf['partial_rotary_factor']}: must be 1")
  field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  rope = dict(hf.get(field) or {})
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
  if rope.pop("partial_rotary_factor", 1.0) != 1.0:
    raise UnsupportedConfig(f"{field}.partial_rotary_factor: must be 1")
  if rope_type == "default":
    return theta, None
  if rope_type not in SCALING_FIELDS:
    raise UnsupportedConfig(f"{field}.rope_type={rope_type!r} is not supported: only default, linear and llama3")
  wanted = ("factor", *SCALING_FIELDS[rope_type])
  if rope.pop("attention_factor", None) not in (None, 1.0):
    raise UnsupportedConfig(f"{field}.attention_factor: only 1 (unscaled sin / cos) is supported")
  extra = sorted(set(rope) - set(wanted))
  if extra:
    raise UnsupportedConfig(f"{field}.{extra[0]} is not supported for rope_type {rope_type!r}")
  missing = [name for name in wanted if rope.get(name) is None]
  if missing:
    raise UnsupportedConfig(f"{field}.{missing[0]}: required for rope_type {rope_type!r}")
  return theta, {"type": rope_type, **{name: rope[name] for name in wanted}}


def _params(scaling: dict[str, Any]) -> dict[str, Any]:
  """The HF rope fields of our rope_scaling dict (all but type, and only those its type reads)."""
  return {name: scaling[name] for name in ("factor", *SCALING_FIELDS.get(scaling.get("type"), ())) if name in scaling}


def _require(hf: dict[str, Any], field: str, want: Any, default: Any, also: tuple = ()) -> None:
  value = hf.get(field, default)
  if value != want and value not in also:
    raise UnsupportedConfig(f"{field}={value!r} is not supported: need {want!r}")


def mimixlm_config(cfg: ModelConfig, tokenizer_config: dict[str, Any], generation: dict[str, Any], dtype: str,
                   model_name: str) -> dict[str, Any]:
  """The original's model_config.json, given our Tokenizer's config.

  Its special_tokens ({role: [text, id]}) are in the original's own format. The original's tokenizer is a
  tiktoken rank file, which cannot express a sentencepiece BPE exactly, so tokenizer_config is ours
  ("tokenizer": "sentencepiece-bpe"): the original's load_model() reads these weights, its load_tokenizer()
  needs a sentencepiece-backed class. eos_id is the one token the original stops on: <|eot_id|> for a chat
  model, <|end_of_text|> otherwise.
  """
  for field, ours, theirs in (("tie_embeddings", cfg.tie_embeddings, True), ("rope_scaling", cfg.rope_scaling, None),
                               ("head_dim", cfg.head_dim, cfg.d_model // cfg.n_heads)):
    if ours != theirs:  # the original's model has a tied head, unscaled RoPE and d_model / n_heads per head
      raise UnsupportedConfig(f"--format mimixlm: model.{field}={ours!r} has no counterpart in the original's "
                              f"model (it needs {theirs!r}); export --format hf only")
  specials = tokenizer_config["special_tokens"]
  chat = generation.get("mode") == "chat"
  return {
      "model_config": {
          "model_name": model_name,
          "vocab_size": cfg.vocab_size,
          "max_len": cfg.max_len,
          "share_emb_out_proj": True,
          "pad_id": specials["pad"][1],
          "eos_id": specials["eot" if chat else "eos"][1],
          "dtype": "bf16" if dtype == "bfloat16" else "float32",
          "n_layers": cfg.n_layers,
          "d_model": cfg.d_model,
          "d_ff": cfg.d_ff,
          "n_heads": cfg.n_heads,
          "n_kv_heads": cfg.n_kv_heads,
          "attention_backend": "torch_native",
          "ln_eps": cfg.norm_eps,
          "attn_pos_embedding_base": cfg.rope_base,
      },
      "tokenizer_config": tokenizer_config,
      "generation_config": {
          "strategy": "sample",
          "top_p": generation.get("top_p"),
          "top_k": generation.get("top_k") or None,
          "temperature": generation.get("temperature"),
          "repetition_penalty": None,
          "max_decode_steps": generation.get("max_new_tokens", 256),
          "system_message": generation.get("system_message"),
          "generation_mode": "chat" if chat else "raw",
      },
  }
