"""The decoder-only transformer (MimixLM / Llama layout) as a Flax NNX module.

Pre-norm blocks: h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h)); a final RMSNorm; logits = h @ E^T with the
embedding E tied to the output projection. GQA attention with rotate-half RoPE (base 500000), gated SiLU FFN,
no biases, N(0, 0.02) init, norm scales 1.

The layers' parameters are stacked along a leading `layers` axis and run under `jax.lax.scan`, so compile
time does not grow with depth (or, with `scan_layers=False`, as an unrolled loop: faster on a CPU).
Shape letters: B batch, T length, S cache length, d model width, H / K query / kv heads, D head dim,
F FFN width, L layers, V (padded) vocabulary.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mimix_jax import attention
from mimix_jax.model_config import ModelConfig
from mimix_jax.sharding import constrain

# k, v: [L, B, S, K, D] (or lists of L [B, S, K, D]: init_cache(per_layer=True)); segment_ids: [B, S];
# end: [] (next free slot)
Cache = dict[str, Any]

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep the projections, recompute norms, RoPE, softmax and the FFN's elementwise ops.
    "save_proj": jax.checkpoint_policies.save_only_these_names("q", "k", "v", "attn_out", "gate", "up"),
}

# name -> (shape as a function of the config, logical axes); every entry has a leading layer axis.
_LAYER_PARAMS = {
    "attn_norm": (lambda c: (c.d_model,), ("norm",)),
    "wq": (lambda c: (c.d_model, c.n_heads, c.head_dim), ("embed", "q_heads", "head_dim")),
    "wk": (lambda c: (c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim")),
    "wv": (lambda c: (c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim")),
    "wo": (lambda c: (c.n_heads, c.head_dim, c.d_model), ("q_heads", "head_dim", "embed")),
    "mlp_norm": (lambda c: (c.d_model,), ("norm",)),
    "w_gate": (lambda c: (c.d_model, c.d_ff), ("embed", "mlp")),
    "w_up": (lambda c: (c.d_model, c.d_ff), ("embed", "mlp")),
    "w_down": (lambda c: (c.d_ff, c.d_model), ("mlp", "embed")),
}


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32 (scale included), cast back to x.dtype, as the reference does."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * scale.astype(jnp.float32)
  return y.astype(x.dtype)


class DecoderLayers(nnx.Module):
  """All L blocks' weights, stacked: e.g. wq is [L, d, H, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    normal = jax.nn.initializers.normal(cfg.init_std)
    for name, (shape_fn, axes) in _LAYER_PARAMS.items():
      shape = (cfg.n_layers, *shape_fn(cfg))
      value = jnp.ones(shape, jnp.float32) if name.endswith("norm") else normal(rngs.params(), shape, jnp.float32)
      setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))

  def stacked(self) -> dict[str, jax.Array]:
    return {name: getattr(self, name)[...] for name in _LAYER_PARAMS}


def project(x: jax.Array, w: jax.Array, n_contract: int = 1, preferred_element_type=None) -> jax.Array:
  """x [..., *in] @ w [*in, *out] -> [..., *out], as one 2-D matmul [N, in] @ [in, out].

  The same as an einsum, but XLA:CPU runs the gradients of 3-D einsums (two contracting dims for dW) about 1.5x
  slower than the flattened matmul; on GPU both compile to the same GEMMs.
  """
  lead, k = x.shape[: x.ndim - n_contract], math.prod(x.shape[x.ndim - n_contract:])
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *w.shape[n_contract:])


def _block(cfg: ModelConfig, h, p, positions, attend, kv_cache, cache_end):
  """One pre-norm block. h [B, T, d]; p: this layer's params; attend(q, k, v) -> [B, T, H, D];
  kv_cache: (k, v) [B, S, K, D] or None."""
  dt = h.dtype
  a = rms_norm(h, p["attn_norm"], cfg.norm_eps)
  q = checkpoint_name(project(a, p["wq"].astype(dt)), "q")  # [B, T, H, D]
  k = checkpoint_name(project(a, p["wk"].astype(dt)), "k")  # [B, T, K, D]
  v = checkpoint_name(project(a, p["wv"].astype(dt)), "v")
  q = attention.apply_rope(q, positions, cfg.max_len, cfg.rope_base)
  k = attention.apply_rope(k, positions, cfg.max_len, cfg.rope_base)
  if kv_cache is not None:  # write this step's keys/values at slots [end, end + T), attend over the whole cache
    k = jax.lax.dynamic_update_slice_in_dim(kv_cache[0], k.astype(kv_cache[0].dtype), cache_end, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(kv_cache[1], v.astype(kv_cache[1].dtype), cache_end, axis=1)
    kv_cache = (k, v)
    k, v = k.astype(dt), v.astype(dt)
  out = checkpoint_name(attend(q, k, v), "attn_out")
  h = h + project(out, p["wo"].astype(dt), n_contract=2)
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


def _attention_for(cfg: ModelConfig, segment_ids, cache: Cache | None, b: int, t: int):
  """attend(q, k, v) -> [B, T, H, D] for this call, and the cache's segment ids after it (None without a cache)."""
  if cache is None and cfg.attention != "xla":  # the fused kernel; rows of one document need no mask at all
    mask = None if segment_ids is None else attention.attention_mask(
        segment_ids, segment_ids, jnp.arange(t), jnp.arange(t))
    return functools.partial(attention.fused_attention, mask=mask, implementation=_fused_implementation(cfg)), None
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  if cache is None:
    mask = attention.attention_mask(segment_ids, segment_ids, jnp.arange(t), jnp.arange(t))
    return functools.partial(attention.causal_attention, bias=attention.mask_bias(mask),
                             q_block=cfg.attention_q_block), None
  end = cache["end"]
  kv_segment = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, end, axis=1)
  mask = attention.attention_mask(segment_ids, kv_segment, end + jnp.arange(t), jnp.arange(kv_segment.shape[1]))
  return functools.partial(attention.xla_attention, bias=attention.mask_bias(mask)), kv_segment


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

  def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
    h, _ = self.hidden(tokens, positions, segment_ids)
    return self.logits(h)

  def hidden(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None,
             layer_weights: list[dict[str, jax.Array]] | None = None):
    """Final-normed hidden states [B, T, d] in the compute dtype, and the updated cache (or None).

    positions [B, T]: RoPE positions (restart at 0 per packed document); default 0..T-1.
    segment_ids [B, T]: document ids, 0 = padding; default one document per row. Attention never crosses
    documents. With a cache, the T tokens are written at slots [cache.end, cache.end + T).
    layer_weights: `split_layers()`, run as an unrolled loop instead of the scan over the stacked weights,
    with a per-layer cache (`init_cache(per_layer=True)`). For decoding: XLA:CPU copies each layer's slice
    of stacked weights and caches on every call, which doubled the time of a decode step. Without a cache,
    `cfg.scan_layers=False` selects the same loop.
    """
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    attend, kv_segment = _attention_for(cfg, segment_ids, cache, b, t)
    kv_layers, end = (None, None) if cache is None else ((cache["k"], cache["v"]), cache["end"])

    h = self.embed[...].astype(dt)[tokens]
    h = constrain(h, "batch", "length", "act_embed")

    def body(h, xs):
      p, kv = xs
      return _block(cfg, h, p, positions, attend, kv, end)

    if cfg.remat != "none" and cache is None:
      if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {cfg.remat!r}; choose from none, {', '.join(REMAT_POLICIES)}")
      body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    if layer_weights is None and cache is None and not cfg.scan_layers:
      layer_weights = self.split_layers()
    if layer_weights is None:
      params = jax.tree.map(lambda x: x.astype(dt) if x.ndim > 2 else x, self.layers.stacked())
      h, new_kv = jax.lax.scan(body, h, (params, kv_layers))
    else:
      new_kv = []
      for i, p in enumerate(layer_weights):
        h, kv = body(h, (p, None if kv_layers is None else (kv_layers[0][i], kv_layers[1][i])))
        new_kv.append(kv)
      new_kv = None if kv_layers is None else tuple(list(x) for x in zip(*new_kv))

    h = rms_norm(h, self.final_norm[...], cfg.norm_eps)
    if cache is None:
      return h, None
    new_cache = dict(k=new_kv[0], v=new_kv[1], segment_ids=kv_segment, end=end + t)
    return h, new_cache

  def split_layers(self) -> list[dict[str, jax.Array]]:
    """The stacked layer weights as one dict per layer, matrices cast to the compute dtype (see hidden())."""
    dt = jnp.dtype(self.cfg.dtype)
    stacked = self.layers.stacked()
    return [{k: (v[i].astype(dt) if v.ndim > 2 else v[i]) for k, v in stacked.items()}
            for i in range(self.cfg.n_layers)]

  def logits(self, h: jax.Array) -> jax.Array:
    """h [B, T, d] -> float32 logits [B, T, V_padded], padded entries -inf."""
    table = self.embed[...].astype(h.dtype)
    logits = project(h, table.T, preferred_element_type=jnp.float32)
    return mask_padded_vocab(logits, self.cfg.vocab_size)

  def init_cache(self, batch: int, length: int, dtype: Any = None, per_layer: bool = False) -> Cache:
    cfg = self.cfg
    shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    if per_layer:
      k, v = ([jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)] for _ in range(2))
    else:
      k, v = (jnp.zeros((cfg.n_layers, *shape), dtype) for _ in range(2))
    return dict(
        k=k,
        v=v,
        segment_ids=jnp.zeros((batch, length), jnp.int32),
        end=jnp.zeros((), jnp.int32),
    )


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
  """Padded-vocabulary logits -> -inf, as an added [V] bias (its gradient is the identity: no select)."""
  if logits.shape[-1] == vocab_size:
    return logits
  return logits + jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, 0.0, -jnp.inf).astype(logits.dtype)


def create(cfg: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStructs instead of arrays (no memory allocated)."""
  return nnx.eval_shape(lambda: create(cfg))


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
