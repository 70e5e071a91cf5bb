"""config.json for Hugging Face Llama and the original's model_config.json, from and to our ModelConfig."""

from __future__ import annotations

from typing import Any

from mimix_jax.model.config import ModelConfig


class UnsupportedConfig(ValueError):
  """A Hugging Face config (or checkpoint) this model cannot represent; the message names the field."""


def hf_config(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int, dtype: str) -> dict[str, Any]:
  """config.json for LlamaForCausalLM that transformers 4.x and 5.x both read the same way."""
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
      "max_position_embeddings": cfg.max_len,
      "initializer_range": cfg.init_std,
      "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": True,
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
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
      "torch_dtype": dtype,
      "dtype": dtype,
  }


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """A Llama config.json -> ModelConfig; raises UnsupportedConfig naming the first field we cannot represent."""
  model_type = hf.get("model_type")
  if model_type != "llama":
    raise UnsupportedConfig(f"model_type={model_type!r}: only Llama-architecture checkpoints (\"llama\") are supported")
  _require(hf, "hidden_act", "silu", default="silu", also=("swish",))
  _require(hf, "attention_bias", False, default=False)
  _require(hf, "mlp_bias", False, default=False)
  _require(hf, "tie_word_embeddings", True, default=False,  # LlamaConfig's default is untied
           why="our model ties the output projection to the embedding")
  if hf.get("quantization_config"):
    raise UnsupportedConfig("quantization_config: quantized checkpoints are not supported; use a float one")
  rope_theta = _rope_theta(hf)
  d, n_heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or d // n_heads
  if head_dim * n_heads != d:
    raise UnsupportedConfig(f"head_dim={head_dim}: must equal hidden_size / num_attention_heads = {d // n_heads}")
  try:
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        n_layers=hf["num_hidden_layers"],
        d_model=d,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"],
        max_len=hf["max_position_embeddings"],
        rope_base=float(rope_theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),  # LlamaConfig's default
        init_std=float(hf.get("initializer_range", 0.02)),
    )
  except KeyError as e:
    raise UnsupportedConfig(f"{e.args[0]}: required field missing from config.json") from None


def _rope_theta(hf: dict[str, Any]) -> float:
  """rope theta from either generation of field names; rejects any scaled RoPE (llama3, yarn, linear, ...)."""
  for field in ("rope_scaling", "rope_parameters"):
    rope = hf.get(field) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise UnsupportedConfig(f"{field}.rope_type={rope_type!r}: only unscaled RoPE (\"default\") is supported")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      raise UnsupportedConfig(f"{field}.partial_rotary_factor={rope['partial_rotary_factor']}: must be 1")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise UnsupportedConfig(f"partial_rotary_factor={hf['partial_rotary_factor']}: must be 1")
  return (hf.get("rope_parameters") or {}).get("rope_theta") or hf.get("rope_theta") or 10000.0


def _require(hf: dict[str, Any], field: str, want: Any, default: Any, also: tuple = (), why: str = "") -> None:
  value = hf.get(field, default)
  if value != want and value not in also:
    reason = f" ({why})" if why else ""
    raise UnsupportedConfig(f"{field}={value!r} is not supported: need {want!r}{reason}")


def mimixlm_config(cfg: ModelConfig, tokenizer_config: dict[str, Any], generation: dict[str, Any], dtype: str,
                   model_name: str) -> dict[str, Any]:
  """The original's model_config.json, given our Tokenizer's config.

  Its special_tokens ({role: [text, id]}) are in the original's own format. The original's tokenizer is a
  tiktoken rank file, which cannot express a sentencepiece BPE exactly, so tokenizer_config is ours
  ("tokenizer": "sentencepiece-bpe"): the original's load_model() reads these weights, its load_tokenizer()
  needs a sentencepiece-backed class. eos_id is the one token the original stops on: <|eot_id|> for a chat
  model, <|end_of_text|> otherwise.
  """
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
