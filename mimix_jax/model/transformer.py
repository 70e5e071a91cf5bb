"""The decoder-only transformer (MimixLM / Llama layout): a Flax NNX module over one functional forward pass.

Pre-norm blocks: h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h)); a final RMSNorm; logits = h @ E^T with the
embedding E tied to the output projection (or, with cfg.tie_embeddings False, an untied head W [V, d]: h @ W^T).
GQA attention with rotate-half RoPE (base 500000, optionally scaled), gated SiLU FFN, no biases, N(0, 0.02)
init, norm scales 1.

The weights are a plain dict: {"embed": [V, d], "layers": {"wq": [L, d, H, D], ...}, "final_norm": [d]} (plus
"lm_head": [V, d] when untied), the layers stacked along a leading axis. `forward` runs stacked layers under `jax.lax.scan` (compile time does not
grow with depth) or a list of per-layer dicts (`split_layers`) as an unrolled loop: faster on a CPU, and the
layout the decode engine keeps, because XLA:CPU would copy each layer's slice of the stacked weights and cache
on every decode step. A KV cache is always per layer.
Shape letters: B batch, T length, S cache length, d model width, H / K query / kv heads, D head dim,
F FFN width, L layers, V (padded) vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mimix_jax.model import attention
from mimix_jax.model.config import ModelConfig
from mimix_jax.model.layers import mask_padded_vocab, project, rms_norm
from mimix_jax.model import sharding
from mimix_jax.model.sharding import constrain

# k, v: lists of L [B, S, K, D]; segment_ids: [B, S]; end: [B] (each row's next free slot: rows of a continuous
# batch decode at their own positions).
Cache = dict[str, Any]
Weights = dict[str, Any]  # embed, layers (stacked dict or list of per-layer dicts), final_norm

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayers(nnx.Module):
  """All L blocks' weights, stacked: e.g. wq is [L, d, H, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    normal = jax.nn.initializers.normal(cfg.init_std)
    for name, (shape, axes) in cfg.layer_params().items():
      shape = (cfg.n_layers, *shape)
      value = jnp.ones(shape, jnp.float32) if name.endswith("norm") else normal(rngs.params(), shape, jnp.float32)
      setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))


class Transformer(nnx.Module):
  """tokens [B, T] -> logits [B, T, V] (float32; padded-vocab logits are -inf)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    normal = jax.nn.initializers.normal(cfg.init_std)
    self.embed = nnx.Param(
        normal(rngs.params(), (cfg.padded_vocab_size, cfg.d_model), jnp.float32), logical_axes=("vocab", "embed")
    )
    self.layers = DecoderLayers(cfg, rngs=rngs)
    self.final_norm = nnx.Param(jnp.ones((cfg.d_model,), jnp.float32), logical_axes=("norm",))
    if not cfg.tie_embeddings:  # same layout and sharding as the embedding, so every loss takes either
      self.lm_head = nnx.Param(
          normal(rngs.params(), (cfg.padded_vocab_size, cfg.d_model), jnp.float32), logical_axes=("vocab", "embed"))

  def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
    h, _ = self.hidden(tokens, positions, segment_ids)
    return logits(self.head(), h, self.cfg.vocab_size)

  def head(self) -> jax.Array:
    """The output projection [V_padded, d]: the embedding when tied, else lm_head."""
    return output_head(self.cfg, vars(self))[...]

  def hidden(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None, mask=None):
    """Final-normed hidden states [B, T, d] in the compute dtype, and the updated cache (None without one)."""
    weights = nnx.to_pure_dict(nnx.state(self, nnx.Param))
    if cache is not None or not self.cfg.scan_layers:
      weights["layers"] = split_layers(weights["layers"], self.cfg)
    return forward(self.cfg, weights, tokens, positions, segment_ids, cache, mask)


def forward(cfg: ModelConfig, weights: Weights, tokens, positions=None, segment_ids=None,
            cache: Cache | None = None, mask=None) -> tuple[jax.Array, Cache | None]:
  """Final-normed hidden states [B, T, d] in the compute dtype, and the updated cache (or None).

  tokens [B, T]; positions [B, T]: RoPE positions (restart at 0 per packed document; default 0..T-1);
  segment_ids [B, T]: document ids, 0 = padding (default one document per row): attention never crosses
  documents. mask [B, T, T] bool, without a cache: who attends to whom, instead of the segment rule (the
  scorer's tree of continuations, attention.tree_mask); it must be causal by slot.
  weights["layers"]: stacked (scanned) or a list of per-layer dicts (unrolled; needed with a cache).
  With a cache, row b's T tokens are written at slots [cache.end[b], cache.end[b] + T).
  """
  dt = jnp.dtype(cfg.dtype)
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  attend, kv_segment = _attention_for(cfg, segment_ids, cache, b, t, mask)
  end = None if cache is None else cache["end"]

  h = constrain(weights["embed"].astype(dt)[tokens], "batch", "length", "act_embed")

  def body(h, xs):
    p, kv = xs
    return _block(cfg, h, p, positions, attend, kv, end)

  if cfg.remat != "none" and cache is None:
    body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
  layers = weights["layers"]
  if isinstance(layers, dict):
    if cache is not None:
      raise ValueError("a KV cache needs the layers as a list (split_layers)")
    h, _ = jax.lax.scan(body, h, (jax.tree.map(lambda x: x.astype(dt) if x.ndim > 2 else x, layers), None))
    new_kv = None
  else:
    kv_layers = [None] * len(layers) if cache is None else list(zip(cache["k"], cache["v"]))
    new_kv = []
    for p, kv in zip(layers, kv_layers):
      h, kv = body(h, (p, kv))
      new_kv.append(kv)

  h = rms_norm(h, weights["final_norm"], cfg.norm_eps)
  if cache is None:
    return h, None
  k, v = (list(x) for x in zip(*new_kv))
  return h, dict(k=k, v=v, segment_ids=kv_segment, end=end + t)


def _block(cfg: ModelConfig, h, p, positions, attend, kv_cache, cache_end):
  """One pre-norm block. h [B, T, d]; p: this layer's params; attend(q, k, v) -> [B, T, H, D];
  kv_cache: (k, v) [B, S, K, D] or None."""
  dt = h.dtype
  a = rms_norm(h, p["attn_norm"], cfg.norm_eps)
  q = checkpoint_name(project(a, p["wq"].astype(dt)), "q")  # [B, T, H, D]
  k = checkpoint_name(project(a, p["wk"].astype(dt)), "k")  # [B, T, K, D]
  v = checkpoint_name(project(a, p["wv"].astype(dt)), "v")
  q = attention.apply_rope(q, positions, cfg.max_len, cfg.rope_base, cfg.rope_scaling)
  k = attention.apply_rope(k, positions, cfg.max_len, cfg.rope_base, cfg.rope_scaling)
  if kv_cache is not None:  # write this step's keys/values at slots [end, end + T), attend over the whole cache
    k = _write_rows(kv_cache[0], k.astype(kv_cache[0].dtype), cache_end)
    v = _write_rows(kv_cache[1], v.astype(kv_cache[1].dtype), cache_end)
    kv_cache = (k, v)
    k, v = k.astype(dt), v.astype(dt)
  out = checkpoint_name(attend(q, k, v), "attn_out")
  h = h + project(out, p["wo"].astype(dt), n_contract=cfg.projection_input_axes()["wo"])
  h = constrain(h, "batch", "length", "act_embed")

  f = rms_norm(h, p["mlp_norm"], cfg.norm_eps)
  gate = checkpoint_name(project(f, p["w_gate"].astype(dt)), "gate")  # [B, T, F]
  up = checkpoint_name(project(f, p["w_up"].astype(dt)), "up")
  h = h + project(jax.nn.silu(gate) * up, p["w_down"].astype(dt))
  return constrain(h, "batch", "length", "act_embed"), kv_cache


def _fused_implementation(cfg: ModelConfig) -> str:
  """"cudnn" or "xla" for jax.nn.dot_product_attention (its own default, None, still means XLA)."""
  if cfg.attention == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"model.attention=cudnn needs a GPU (this backend is {jax.default_backend()}); "
                     "model.attention=fused uses cuDNN where it can and XLA elsewhere")
  if cfg.attention != "fused":
    return cfg.attention
  cudnn_ok = jax.default_backend() == "gpu" and cfg.dtype in ("bfloat16", "float16")  # cuDNN wants 16-bit inputs
  return "cudnn" if cudnn_ok else "xla"


def _attention_for(cfg: ModelConfig, segment_ids, cache: Cache | None, b: int, t: int, mask=None):
  """attend(q, k, v) -> [B, T, H, D] for this call, and the cache's segment ids after it (None without a cache)."""
  if segment_ids is None and (cache is not None or (mask is None and cfg.attention == "xla")):
    segment_ids = jnp.ones((b, t), jnp.int32)
  if cache is not None:
    if mask is not None:
      raise ValueError("an explicit attention mask is for a full forward pass, not a cached one")
    end = cache["end"]
    kv_segment = _write_rows(cache["segment_ids"], segment_ids, end)
    q_slot = end[:, None] + jnp.arange(t)  # [B, T]
    mask = attention.attention_mask(segment_ids, kv_segment, q_slot, jnp.arange(kv_segment.shape[1]))
    return functools.partial(attention.xla_attention, bias=attention.mask_bias(mask)), kv_segment
  if mask is None and segment_ids is not None:
    mask = attention.attention_mask(segment_ids, segment_ids, jnp.arange(t), jnp.arange(t))
  if cfg.attention != "xla":  # the fused kernel; rows of one document need no mask at all
    return functools.partial(attention.fused_attention, mask=mask, implementation=_fused_implementation(cfg)), None
  return functools.partial(attention.causal_attention, bias=attention.mask_bias(mask),
                           q_block=cfg.attention_q_block), None


def _write_rows(buffer: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
  """buffer [B, S, ...] with row b's update [B, T, ...] written at slots [starts[b], starts[b] + T)."""
  return jax.vmap(lambda buf, upd, at: jax.lax.dynamic_update_slice_in_dim(buf, upd, at, axis=0))(
      buffer, update, starts)


def split_layers(stacked: dict[str, jax.Array], cfg: ModelConfig) -> list[dict[str, jax.Array]]:
  """Stacked layer weights -> one dict per layer, matrices cast to the compute dtype (norms stay float32)."""
  dt = jnp.dtype(cfg.dtype)
  return [{k: (v[i].astype(dt) if v.ndim > 2 else v[i]) for k, v in stacked.items()} for i in range(cfg.n_layers)]


def output_head(cfg: ModelConfig, weights: Weights) -> jax.Array:
  """The output projection [V_padded, d] of a weights dict: the embedding when tied, else lm_head."""
  return weights["embed"] if cfg.tie_embeddings else weights["lm_head"]


def logits(head: jax.Array, h: jax.Array, vocab_size: int) -> jax.Array:
  """h [B, T, d] -> float32 logits [B, T, V_padded] through the output projection [V_padded, d]; padding -inf."""
  table = head.astype(h.dtype)
  return mask_padded_vocab(project(h, table.T, preferred_element_type=jnp.float32), vocab_size)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> Cache:
  """An empty cache of `length` slots per row, one k and one v array [B, S, K, D] per layer."""
  shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.dtype
  return dict(k=[jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
              v=[jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
              segment_ids=jnp.zeros((batch, length), jnp.int32), end=jnp.zeros((batch,), jnp.int32))


def create(cfg: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStructs instead of arrays (no memory allocated)."""
  return nnx.eval_shape(lambda: create(cfg))


def init_params(cfg: ModelConfig, seed: int = 0) -> Weights:
  """Freshly initialised weights as a plain dict (float32)."""
  return nnx.to_pure_dict(nnx.state(create(cfg, seed), nnx.Param))


def abstract_params(cfg: ModelConfig) -> Weights:
  """ShapeDtypeStructs of `init_params`."""
  return nnx.to_pure_dict(nnx.state(abstract(cfg), nnx.Param))


def param_shardings(cfg: ModelConfig, mesh, rules=sharding.DEFAULT_RULES) -> Weights:
  """NamedShardings shaped like `init_params`, from each parameter's logical axes and the rules."""
  return sharding.param_shardings(nnx.state(abstract(cfg), nnx.Param), mesh, rules)


def from_params(cfg: ModelConfig, params: Weights) -> Transformer:
  """The module holding `params` (a plain dict, e.g. restored from a checkpoint)."""
  graphdef, _ = nnx.split(abstract(cfg))
  return nnx.merge(graphdef, params)
