"""Name, layout and dtype mapping between our params and PyTorch state dicts (Hugging Face Llama, MimixLM).

Our params are a pure dict with the layers stacked: embed [V_padded, d], layers: {attn_norm [L, d],
wq [L, d, H, D], wk / wv [L, d, K, D], wo [L, H, D, d], mlp_norm [L, d], w_gate / w_up [L, d, F],
w_down [L, F, d]}, final_norm [d]. Both PyTorch layouts store one tensor per layer with Linear weights as
[out, in] (y = x @ W.T) and the heads flattened head-major (feature = head * D + j). Both use rotate-half RoPE,
like our model, so q / k need no permutation. The output projection is tied to the embedding, and the padded
vocabulary rows (>= vocab_size) exist only here: they are stripped on export and zero-filled on import.

Everything here is NumPy (float32 in, float32 out); dtype casts happen when files are written.
"""

from __future__ import annotations

import numpy as np

from mimix_jax.hf.configs import UnsupportedConfig
from mimix_jax.model import rope
from mimix_jax.model.config import ModelConfig

# Per-layer tensor names: Hugging Face Llama, then MimixLM in its state_dict() order.
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


def to_torch_state_dict(params: dict, cfg: ModelConfig, fmt: str = "hf") -> dict[str, np.ndarray]:
  """Our params (NumPy) -> {name: float32 array} in the "hf" or "mimixlm" naming, padded vocab rows stripped.

  The MimixLM dict follows the original's state_dict() order, RoPE buffer included.
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
  """The original's RoPE buffer [max_len, D]: sin at even columns, cos at odd (our angles, stored float32)."""
  sin, cos = rope.sin_cos(max_len, head_dim, base)
  table = np.empty((max_len, head_dim), np.float32)
  table[:, 0::2], table[:, 1::2] = sin, cos
  return table


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _take(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
  if name not in tensors:
    raise UnsupportedConfig(f"tensor {name!r} is missing from the checkpoint")
  return np.asarray(tensors.pop(name), dtype=np.float32)


def _take_layer(tensors: dict[str, np.ndarray], name: str, key: str, cfg: ModelConfig) -> np.ndarray:
  """tensors[key], PyTorch [out, in] -> our layout for `name` (the inverse of layer_to_torch), shape-checked."""
  shape = cfg.layer_params()[name][0]
  expected = layer_to_torch(name, np.broadcast_to(np.float32(0), shape)).shape
  w = _take(tensors, key)
  if w.shape != expected:
    raise UnsupportedConfig(f"{key}: shape {w.shape}, but config.json implies {expected}")
  return w if w.ndim == 1 else w.T.reshape(shape)
