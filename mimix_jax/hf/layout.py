"""Name, layout and dtype mapping between our params and PyTorch state dicts (Hugging Face Llama, MimixLM).

Our params are a pure dict with the layers stacked: embed [V_padded, d], layers: {attn_norm [L, d],
wq [L, d, H, D], wk / wv [L, d, K, D], wo [L, H, D, d], mlp_norm [L, d], w_gate / w_up [L, d, F],
w_down [L, F, d]}, final_norm [d]. Both PyTorch layouts store one tensor per layer with Linear weights as
[out, in] (y = x @ W.T) and the heads flattened head-major (feature = head * D + j). Both use rotate-half RoPE,
like our model, so q / k need no permutation. The output projection is the embedding or, untied, lm_head
[V_padded, d] (HF lm_head.weight [V, d]); the padded vocabulary rows (>= vocab_size) exist only here: they are
stripped on export and zero-filled on import.

Everything here is NumPy: export gives float32 (dtype casts happen when files are written); import fills the
params in the checkpoint's dtype or the one asked for.
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

  An untied head becomes lm_head.weight (hf only: the original's model is always tied, hf/configs.py checks).
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
    if not cfg.tie_embeddings:
      out[HF_LM_HEAD] = _f32(params["lm_head"][: cfg.vocab_size])
  else:
    out[MIMIXLM_ROPE] = mimixlm_rope_buffer(cfg.max_len, cfg.head_dim, cfg.rope_base)
    out[MIMIXLM_FINAL_NORM] = _f32(params["final_norm"])
  return out


class ParamFiller:
  """Our params built from Hugging Face Llama tensors handed over one at a time, in any order.

  Each tensor is shape-checked, converted from PyTorch [out, in] into its slot of the (preallocated on first
  use) result and can be dropped at once, so a checkpoint streams shard by shard with no second copy: host
  memory holds the result plus the tensor being converted. `dtype` None keeps each tensor's dtype, otherwise
  casts (float32, ml_dtypes.bfloat16). The embedding (and an untied lm_head) is zero-padded to
  cfg.padded_vocab_size. A tied checkpoint may still store lm_head.weight: it must equal the embedding.
  """

  def __init__(self, cfg: ModelConfig, dtype=None):
    self.cfg, self.dtype = cfg, dtype
    self.params: dict = {"layers": {}}
    self.filled: set[str] = set()
    self.pending_head: np.ndarray | None = None  # a tied lm_head.weight seen before the embedding
    self.slots = {HF_EMBED: ("embed", None), HF_FINAL_NORM: ("final_norm", None)}  # HF name -> (ours, layer)
    if not cfg.tie_embeddings:
      self.slots[HF_LM_HEAD] = ("lm_head", None)
    for name, template in HF_LAYER_NAMES.items():
      self.slots.update({template.format(i=i): (name, i) for i in range(cfg.n_layers)})
    self.torch_shapes = {"embed": (cfg.vocab_size, cfg.d_model), "lm_head": (cfg.vocab_size, cfg.d_model),
                         "final_norm": (cfg.d_model,)}
    for name, (shape, _) in cfg.layer_params().items():
      self.torch_shapes[name] = layer_to_torch(name, np.broadcast_to(np.float32(0), shape)).shape

  def add(self, key: str, w: np.ndarray) -> None:
    if key.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; recomputed from the config
      return
    if key == HF_LM_HEAD and self.cfg.tie_embeddings:
      return self._tied_head(w)
    if key not in self.slots:
      raise UnsupportedConfig(f"unexpected tensor {key!r} in the checkpoint (biases or another architecture?)")
    if key in self.filled:
      raise UnsupportedConfig(f"tensor {key!r} appears twice in the checkpoint")
    name, layer = self.slots[key]
    expected = self.torch_shapes[name]
    if w.shape != expected:
      raise UnsupportedConfig(f"{key}: shape {w.shape}, but config.json implies {expected}")
    slot = self._slot(name, layer, w.dtype)
    if layer is not None:  # [out, in] -> our [in, ...]: into a [in, out] view of the (contiguous) slot
      slot, w = slot.reshape(expected[::-1]), w.T
    np.copyto(slot, w, casting="unsafe")
    self.filled.add(key)
    if key == HF_EMBED and self.pending_head is not None:
      self._tied_head(self.pending_head)

  def result(self) -> dict:
    missing = sorted(set(self.slots) - self.filled)
    if missing:
      why = " (config.json says tie_word_embeddings: false)" if missing[0] == HF_LM_HEAD else ""
      raise UnsupportedConfig(f"tensor {missing[0]!r} is missing from the checkpoint{why}")
    return self.params  # a pending tied head was checked when the embedding came

  def _slot(self, name: str, layer: int | None, dtype) -> np.ndarray:
    """The array of `name` (allocated on first use), or layer `layer` of it, without the padded rows."""
    cfg, home = self.cfg, self.params if layer is None else self.params["layers"]
    if name not in home:
      if layer is not None:
        shape = (cfg.n_layers, *cfg.layer_params()[name][0])
      else:  # the embedding and lm_head get their padded rows
        shape = (cfg.d_model,) if name == "final_norm" else (cfg.padded_vocab_size, cfg.d_model)
      home[name] = np.zeros(shape, self.dtype or dtype)  # zeros: the padded vocabulary rows stay 0
    if layer is not None:
      return home[name][layer]
    return home[name] if name == "final_norm" else home[name][: cfg.vocab_size]

  def _tied_head(self, head: np.ndarray) -> None:
    if HF_EMBED not in self.filled:
      self.pending_head = head
      return
    self.pending_head = None
    embed = self.params["embed"][: self.cfg.vocab_size]
    if head.shape != embed.shape or not np.array_equal(head.astype(embed.dtype), embed):
      raise UnsupportedConfig(f"{HF_LM_HEAD} differs from {HF_EMBED} but config.json says tie_word_embeddings: "
                              "true (an untied checkpoint needs tie_word_embeddings false)")


def mimixlm_rope_buffer(max_len: int, head_dim: int, base: float) -> np.ndarray:
  """The original's RoPE buffer [max_len, D]: sin at even columns, cos at odd (our angles, stored float32)."""
  sin, cos = rope.sin_cos(max_len, head_dim, base)
  table = np.empty((max_len, head_dim), np.float32)
  table[:, 0::2], table[:, 1::2] = sin, cos
  return table


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))
