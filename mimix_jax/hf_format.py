"""Name, layout and config mapping between our params and PyTorch state dicts (Hugging Face Llama, MimixLM).

Our params are a pure dict with the layers stacked: embed [V_padded, d], layers: {attn_norm [L, d],
wq [L, d, H, D], wk / wv [L, d, K, D], wo [L, H, D, d], mlp_norm [L, d], w_gate / w_up [L, d, F],
w_down [L, F, d]}, final_norm [d]. Both PyTorch layouts store one tensor per layer with Linear weights as
[out, in] (y = x @ W.T) and the heads flattened head-major (feature = head * D + j). Both use rotate-half RoPE,
like our model, so q / k need no permutation. The output projection is tied to the embedding, and the padded
vocabulary rows (>= vocab_size) exist only here: they are stripped on export and zero-filled on import.

Everything here is NumPy (float32 in, float32 out); dtype casts happen when files are written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mimix_jax.model_config import ModelConfig

# Per-layer tensor names: Hugging Face Llama, then MimixLM in its state_dict() order (spec §2.1).
HF_LAYER_NAMES = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
}
HF_EMBED, HF_FINAL_NORM, HF_LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"

MIMIXLM_LAYER_NAMES = {
    "attn_norm": "lm_model.transformer.layers.{i}.first_norm.alpha",
    "wq": "lm_model.transformer.layers.{i}.self_attention.q_proj.W",
    "wk": "lm_model.transformer.layers.{i}.self_attention.k_proj.W",
    "wv": "lm_model.transformer.layers.{i}.self_attention.v_proj.W",
    "wo": "lm_model.transformer.layers.{i}.self_attention.o_proj.W",
    "mlp_norm": "lm_model.transformer.layers.{i}.last_norm.alpha",
    "w_up": "lm_model.transformer.layers.{i}.ffn.up_proj.W",
    "w_gate": "lm_model.transformer.layers.{i}.ffn.gate_proj.W",
    "w_down": "lm_model.transformer.layers.{i}.ffn.down_proj.W",
}
MIMIXLM_EMBED = "lm_model.word_embedding.W"
MIMIXLM_ROPE = "lm_model.transformer.rope_embedding.W"  # a buffer: in state_dict(), ignored on load
MIMIXLM_FINAL_NORM = "lm_model.last_norm.alpha"


# Our Tokenizer's own tokenizer_config.json, kept in exports under this name (transformers owns
# tokenizer_config.json there) so that import_hf restores the tokenizer byte for byte.
MIMIX_TOKENIZER_CONFIG = "mimix_tokenizer_config.json"


class UnsupportedConfig(ValueError):
  """A Hugging Face config (or checkpoint) this model cannot represent; the message names the field."""


# ---------------------------------------------------------------------------------------------------------------
# Tensor layouts


def layer_to_torch(name: str, w: np.ndarray) -> np.ndarray:
  """One layer's tensor, our layout -> PyTorch [out, in] (norms unchanged).

  wq/wk/wv [d, N, D] -> [N*D, d]; wo [H, D, d] -> [d, H*D]; w_gate/w_up [d, F] -> [F, d]; w_down [F, d] -> [d, F].
  """
  if name in ("wq", "wk", "wv"):
    return w.reshape(w.shape[0], -1).T
  if name == "wo":
    return w.reshape(-1, w.shape[-1]).T
  if name in ("w_gate", "w_up", "w_down"):
    return w.T
  return w


def our_layer_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
  """One layer's shape of a stacked param (without the leading L)."""
  d, f, hd, h, k = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
  return {"attn_norm": (d,), "mlp_norm": (d,), "wq": (d, h, hd), "wk": (d, k, hd), "wv": (d, k, hd),
          "wo": (h, hd, d), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}[name]


def to_torch_state_dict(params: dict, cfg: ModelConfig, fmt: str = "hf") -> dict[str, np.ndarray]:
  """Our params (NumPy) -> {name: float32 array} in the "hf" or "mimixlm" naming, padded vocab rows stripped.

  The MimixLM dict follows the reference's state_dict() order, RoPE buffer included (spec §2.1).
  """
  layer_names = HF_LAYER_NAMES if fmt == "hf" else MIMIXLM_LAYER_NAMES
  out = {HF_EMBED if fmt == "hf" else MIMIXLM_EMBED: _f32(params["embed"][: cfg.vocab_size])}
  layers = params["layers"]
  for i in range(cfg.n_layers):
    for name, template in layer_names.items():
      out[template.format(i=i)] = _f32(layer_to_torch(name, np.asarray(layers[name][i])))
  if fmt == "hf":
    out[HF_FINAL_NORM] = _f32(params["final_norm"])
  else:
    out[MIMIXLM_ROPE] = mimixlm_rope_buffer(cfg.max_len, cfg.head_dim, cfg.rope_base)
    out[MIMIXLM_FINAL_NORM] = _f32(params["final_norm"])
  return out


def from_hf_state_dict(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """HF Llama tensors (tied) -> our params pure dict (float32), embedding zero-padded to cfg.padded_vocab_size."""
  tensors = dict(tensors)
  tensors.pop(HF_LM_HEAD, None)  # tied: the caller has checked it equals the embedding (or is absent)
  embed = _take(tensors, HF_EMBED)
  if embed.shape != (cfg.vocab_size, cfg.d_model):
    raise UnsupportedConfig(f"{HF_EMBED}: shape {embed.shape}, but config.json implies {(cfg.vocab_size, cfg.d_model)}")
  padded = np.zeros((cfg.padded_vocab_size, cfg.d_model), np.float32)
  padded[: cfg.vocab_size] = embed
  layers = {
      name: np.stack([_take_layer(tensors, name, t.format(i=i), cfg) for i in range(cfg.n_layers)])
      for name, t in HF_LAYER_NAMES.items()
  }
  final_norm = _take(tensors, HF_FINAL_NORM)
  if tensors:
    raise UnsupportedConfig(f"unexpected tensors in the checkpoint (biases or another architecture?): "
                            f"{sorted(tensors)[:5]}")
  return {"embed": padded, "layers": layers, "final_norm": final_norm}


def mimixlm_rope_buffer(max_len: int, head_dim: int, base: float) -> np.ndarray:
  """The reference's RoPE buffer [max_len, D]: sin at even columns, cos at odd (float64 maths, stored float32)."""
  inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  angles = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq[None, :]
  table = np.empty((max_len, head_dim), np.float64)
  table[:, 0::2], table[:, 1::2] = np.sin(angles), np.cos(angles)
  return table.astype(np.float32)


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _take(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
  if name not in tensors:
    raise UnsupportedConfig(f"tensor {name!r} is missing from the checkpoint")
  return np.asarray(tensors.pop(name), dtype=np.float32)


def _take_layer(tensors: dict[str, np.ndarray], name: str, key: str, cfg: ModelConfig) -> np.ndarray:
  """tensors[key], PyTorch [out, in] -> our layout for `name` (the inverse of layer_to_torch), shape-checked."""
  shape = our_layer_shape(name, cfg)
  expected = layer_to_torch(name, np.broadcast_to(np.float32(0), shape)).shape
  w = _take(tensors, key)
  if w.shape != expected:
    raise UnsupportedConfig(f"{key}: shape {w.shape}, but config.json implies {expected}")
  return w if w.ndim == 1 else w.T.reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# Configs


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
  """The reference's model_config.json (spec §2.3), given our Tokenizer's config.

  Its special_tokens ({role: [text, id]}) are in the reference's own format. The reference's tokenizer is a
  tiktoken rank file, which cannot express a sentencepiece BPE exactly, so tokenizer_config is ours
  ("tokenizer": "sentencepiece-bpe"): the reference's load_model() reads these weights, its load_tokenizer()
  needs a sentencepiece-backed class. eos_id is the token the reference stops on: <|eot_id|> for a chat model
  (spec §12.16), <|end_of_text|> otherwise.
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


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


# Where our Tokenizer cuts text before sentencepiece sees it (tokenizer.split_for_encoding), as regexes whose
# match ends at the cut: after a blank line followed by text, and between "<" and "|".
PARAGRAPH_CUT = r"\n\r?\n(?=[^\r\n])"
SPECIAL_CUT = r"<(?=\|)"


def hf_tokenizer_json(sp_model: bytes, bos_token: str) -> dict[str, Any]:
  """A sentencepiece BPE model -> tokenizer.json that `tokenizers` encodes to the same ids as our Tokenizer.

  SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece, over the
  whole (normalized) string it is given; its ids follow the scores. So: a BPE model with merges ranked by the
  merged piece's id, byte fallback, and every user-defined piece (our specials) as a special added token.
  Control and unknown pieces (<unk>) are not added tokens: sentencepiece never matches their text.
  Our Tokenizer.encode hands sentencepiece the text in chunks (tokenizer.split_for_encoding): it cuts after each
  blank line followed by text and between "<" and "|"; the pre-tokenizer makes the same cuts. (Its third cut,
  inside paragraphs longer than CHUNK_CHARS, depends on line lengths and has no pre-tokenizer equivalent: ids
  of such paragraphs may differ around the cut.) A single sequence gets `bos_token` prepended, as our
  raw-mode prompts do.
  """
  from sentencepiece import sentencepiece_model_pb2  # needs protobuf

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(sp_model)
  _check_convertible(proto)
  kind = sentencepiece_model_pb2.ModelProto.SentencePiece.Type
  pieces = [(p.piece, p.type) for p in proto.pieces]
  vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
  normal = {piece for piece, t in pieces if t == kind.NORMAL}
  merges = []  # (rank of the merged piece, left id, right id, left, right)
  for piece in normal:
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in normal and right in normal:
        merges.append((vocab[piece], vocab[left], vocab[right], left, right))
  merges.sort()
  added = [
      {"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
       "special": True}
      for i, (piece, t) in enumerate(pieces) if t == kind.USER_DEFINED
  ]
  unk = proto.pieces[proto.trainer_spec.unk_id].piece if proto.trainer_spec.unk_id >= 0 else None
  bos_id = vocab[bos_token]
  return {
      "version": "1.0",
      "truncation": None,
      "padding": None,
      "added_tokens": added,
      # sentencepiece's only normalization here: spaces are written as U+2581.
      "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"Regex": PARAGRAPH_CUT}, "behavior": "MergedWithPrevious", "invert": False},
          {"type": "Split", "pattern": {"Regex": SPECIAL_CUT}, "behavior": "MergedWithPrevious", "invert": False},
      ]},
      "post_processor": {
          "type": "TemplateProcessing",
          "single": [{"SpecialToken": {"id": bos_token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
          "pair": [{"SpecialToken": {"id": bos_token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": bos_token, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
          "special_tokens": {bos_token: {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}},
      },
      "decoder": {
          "type": "Sequence",
          "decoders": [
              {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
              {"type": "ByteFallback"},
              {"type": "Fuse"},
          ],
      },
      "model": {
          "type": "BPE",
          "dropout": None,
          "unk_token": unk,
          "continuing_subword_prefix": None,
          "end_of_word_suffix": None,
          "fuse_unk": True,
          "byte_fallback": bool(proto.trainer_spec.byte_fallback),
          "ignore_merges": False,
          "vocab": vocab,
          "merges": [[left, right] for *_, left, right in merges],
      },
  }


def _check_convertible(proto) -> None:
  """Rejects sentencepiece options the tokenizer.json above does not reproduce."""
  norm, trainer = proto.normalizer_spec, proto.trainer_spec
  problems = {
      "model_type": trainer.model_type != trainer.BPE,
      "normalizer_spec.precompiled_charsmap": bool(norm.precompiled_charsmap),
      "normalizer_spec.add_dummy_prefix": norm.add_dummy_prefix,
      "normalizer_spec.remove_extra_whitespaces": norm.remove_extra_whitespaces,
      "normalizer_spec.escape_whitespaces": not norm.escape_whitespaces,
      "trainer_spec.treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix,
  }
  bad = [name for name, is_bad in problems.items() if is_bad]
  if bad:
    raise UnsupportedConfig(f"tokenizer.model: {bad[0]} is not supported for the Hugging Face tokenizer export "
                            "(need BPE, identity normalization, no dummy prefix, no whitespace folding)")
