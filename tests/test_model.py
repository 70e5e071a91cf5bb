"""The model against an independent NumPy float64 forward pass written from the original's description."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimix_jax.model import attention, sharding
from mimix_jax.model import transformer as model_lib
from mimix_jax.model.config import PRESETS, ModelConfig, preset

# attention_q_block 4: every test below also runs the causal block skipping, with a shorter last block where
# the length is not a multiple of 4.
SMALL = ModelConfig(vocab_size=101, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, max_len=64,
                    vocab_multiple=16, attention_q_block=4)


@pytest.mark.parametrize("name,expected", [("small", 31_226_368), ("base", 121_191_168),
                                           ("large", 353_502_208), ("xl", 504_521_728)])
def test_preset_param_counts_match_reference(name, expected):
  cfg = preset(name)
  assert cfg.param_count() == expected
  # The built model holds exactly the padded count (extra rows only from vocabulary padding).
  assert sum(x.size for x in jax.tree.leaves(model_lib.abstract_params(cfg))) == cfg.param_count(padded=True)
  assert cfg.param_count(padded=True) - expected == (cfg.padded_vocab_size - cfg.vocab_size) * cfg.d_model


def test_large_preset_shape():
  assert PRESETS["large"] == dict(vocab_size=50256, n_layers=24, d_model=1024, n_heads=8, n_kv_heads=4, d_ff=3072)


# ---------------------------------------------------------------- NumPy reference

def _reference_weights(params, cfg):
  """Our params -> the reference's [d_out, d_in] matrices, float64."""
  f = lambda x: np.asarray(x, np.float64)
  layers = params["layers"]
  d = cfg.d_model
  out = []
  for i in range(cfg.n_layers):
    out.append(dict(
        first_norm=f(layers["attn_norm"][i]),
        q=f(layers["wq"][i]).reshape(d, -1).T, k=f(layers["wk"][i]).reshape(d, -1).T,
        v=f(layers["wv"][i]).reshape(d, -1).T, o=f(layers["wo"][i]).reshape(-1, d).T,
        last_norm=f(layers["mlp_norm"][i]),
        gate=f(layers["w_gate"][i]).T, up=f(layers["w_up"][i]).T, down=f(layers["w_down"][i]).T))
  return f(params["embed"])[: cfg.vocab_size], out, f(params["final_norm"])


def numpy_forward(params, cfg, tokens, positions, segments):
  """Reference forward, float64: pre-norm RMSNorm, rotate-half RoPE, GQA (head h uses kv head h // (H/K))."""
  emb, layers, final_norm = _reference_weights(params, cfg)
  B, T = tokens.shape
  H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

  def rms(x, a):
    return a * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps)

  inv = cfg.rope_base ** (-np.arange(0, D, 2) / D)
  ang = positions[..., None] * inv  # [B, T, D/2]
  cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]  # [B, 1, T, D]
  sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]
  rope = lambda x: x * cos + np.concatenate([-x[..., D // 2:], x[..., : D // 2]], -1) * sin

  idx = np.arange(T)
  allowed = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0) & (idx[None, :] <= idx[:, None])
  h = emb[tokens]
  for w in layers:
    a = rms(h, w["first_norm"])
    q = (a @ w["q"].T).reshape(B, T, H, D).transpose(0, 2, 1, 3)
    k = (a @ w["k"].T).reshape(B, T, K, D).transpose(0, 2, 1, 3)
    v = (a @ w["v"].T).reshape(B, T, K, D).transpose(0, 2, 1, 3)
    k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)  # HF repeat_kv: contiguous copies
    q, k = rope(q), rope(k)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
    s = np.where(allowed[:, None], s, -1e30)  # finite: padding rows (nothing allowed) stay NaN-free
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    h = h + o @ w["o"].T
    f = rms(h, w["last_norm"])
    g = f @ w["gate"].T
    h = h + ((g / (1 + np.exp(-g))) * (f @ w["up"].T)) @ w["down"].T
  return rms(h, final_norm) @ emb.T


def _check_against_numpy(cfg, tokens, positions, segments, seed=0):
  model = model_lib.create(cfg, seed=seed)
  ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
  params = jax.tree.map(np.asarray, model_lib.init_params(cfg, seed))
  ref = numpy_forward(params, cfg, tokens, positions.astype(np.float64), segments)
  real = segments != 0
  assert np.all(np.isneginf(ours[..., cfg.vocab_size:]))  # padded vocab can never be predicted
  np.testing.assert_allclose(ours[..., : cfg.vocab_size][real], ref[real], rtol=1e-5, atol=1e-5)


def test_logits_match_numpy_reference_right_padding():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, SMALL.vocab_size, (3, 12))
  lengths = np.array([12, 7, 3])
  segments = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  positions = np.broadcast_to(np.arange(12), (3, 12)).copy()
  _check_against_numpy(SMALL, tokens, positions, segments)


def test_logits_match_numpy_reference_packed_segments():
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, SMALL.vocab_size, (2, 16))
  segments = np.array([[1] * 5 + [2] * 6 + [3] * 5, [1] * 9 + [2] * 4 + [0] * 3])
  positions = np.array([list(range(5)) + list(range(6)) + list(range(5)),
                        list(range(9)) + list(range(4)) + [0, 0, 0]])
  _check_against_numpy(SMALL, tokens, positions, segments)


def test_logits_match_numpy_reference_multihead_attention_and_deep_gqa():
  for n_kv in (4, 1):  # MHA and multi-query
    cfg = dataclasses.replace(SMALL, n_kv_heads=n_kv)
    tokens = np.random.default_rng(n_kv).integers(0, cfg.vocab_size, (2, 10))
    _check_against_numpy(cfg, tokens, np.broadcast_to(np.arange(10), (2, 10)).copy(), np.ones((2, 10), np.int32))


def test_causality_future_tokens_never_change_past_logits():
  model = model_lib.create(SMALL, seed=2)
  tokens = np.random.default_rng(2).integers(0, SMALL.vocab_size, (1, 12))
  changed = tokens.copy()
  changed[0, 8:] = (changed[0, 8:] + 1) % SMALL.vocab_size
  a, b = np.asarray(model(tokens)), np.asarray(model(changed))
  np.testing.assert_array_equal(a[:, :8], b[:, :8])
  assert not np.allclose(a[:, 8:, : SMALL.vocab_size], b[:, 8:, : SMALL.vocab_size])


def test_segment_isolation_document_a_never_changes_document_b():
  model = model_lib.create(SMALL, seed=3)
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, SMALL.vocab_size, (1, 14))
  segments = np.array([[1] * 6 + [2] * 8])
  positions = np.array([list(range(6)) + list(range(8))])
  changed = tokens.copy()
  changed[0, :6] = rng.integers(0, SMALL.vocab_size, 6)  # rewrite document A entirely
  a = np.asarray(model(tokens, positions, segments))
  b = np.asarray(model(changed, positions, segments))
  np.testing.assert_array_equal(a[:, 6:], b[:, 6:])
  # Document B alone in its own row gives the same logits: packing is invisible.
  alone = np.asarray(model(tokens[:, 6:], positions[:, 6:], np.ones((1, 8), np.int32)))
  np.testing.assert_allclose(a[:, 6:, : SMALL.vocab_size], alone[..., : SMALL.vocab_size], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_block", [0, 1, 3, 5, 16])
def test_causal_attention_blocks_give_the_xla_path_and_its_gradients(q_block):
  rng = np.random.default_rng(10)
  q = jnp.asarray(rng.normal(size=(2, 15, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 15, 2, 8)), jnp.float32) for _ in range(2))
  segments = np.array([[1] * 5 + [2] * 6 + [3] * 4, [1] * 9 + [2] * 3 + [0] * 3])
  slots = jnp.arange(15)
  bias = attention.mask_bias(attention.attention_mask(segments, segments, slots, slots))
  real = jnp.asarray(segments != 0)[:, :, None, None]  # padding rows attend to nothing; never used
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * weights)

  blocked = lambda q, k, v: attention.causal_attention(q, k, v, bias, q_block=q_block)
  plain = lambda q, k, v: attention.xla_attention(q, k, v, bias)
  np.testing.assert_allclose(np.asarray(blocked(q, k, v) * real), np.asarray(plain(q, k, v) * real),
                             rtol=1e-5, atol=1e-6)
  got = jax.grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_fused_attention_equals_the_xla_path_on_packed_and_unpacked_rows():
  # jax.nn.dot_product_attention's portable implementation runs the same wrapper, mask and GQA layout as cuDNN.
  rng = np.random.default_rng(8)
  q = jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.float32) for _ in range(2))
  packed = np.array([[1] * 5 + [2] * 6 + [3] * 5, [1] * 9 + [2] * 4 + [0] * 3])
  one_doc = np.ones_like(packed)
  slots = jnp.arange(16)
  for segments, mask_arg in ((packed, "mask"), (one_doc, None)):
    mask = attention.attention_mask(segments, segments, slots, slots)
    expected = np.asarray(attention.xla_attention(q, k, v, attention.mask_bias(mask)))
    got = np.asarray(attention.fused_attention(q, k, v, mask if mask_arg else None, implementation="xla"))
    real = segments != 0  # padding rows attend to nothing; their output is never used
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_model_with_fused_attention_matches_the_xla_model_packed_or_not():
  fused = dataclasses.replace(SMALL, attention="fused")  # on a CPU: jax's XLA version of the fused op
  tokens = np.random.default_rng(9).integers(0, SMALL.vocab_size, (2, 16))
  segments = np.array([[1] * 5 + [2] * 6 + [3] * 5, [1] * 9 + [2] * 4 + [0] * 3])
  positions = np.array([list(range(5)) + list(range(6)) + list(range(5)), list(range(9)) + list(range(4)) + [0] * 3])
  ours, theirs = model_lib.create(SMALL, seed=9), model_lib.create(fused, seed=9)
  real = segments != 0
  np.testing.assert_allclose(np.asarray(theirs(tokens, positions, segments))[real],
                             np.asarray(ours(tokens, positions, segments))[real], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(theirs(tokens)), np.asarray(ours(tokens)), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="attention must be"):
    dataclasses.replace(SMALL, attention="flash")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="attention=cudnn needs a GPU"):
      model_lib.create(dataclasses.replace(SMALL, attention="cudnn"), seed=9)(tokens)


def test_bfloat16_compute_stays_close_to_float32():
  tokens = np.random.default_rng(4).integers(0, SMALL.vocab_size, (2, 8))
  f32 = np.asarray(model_lib.create(SMALL, seed=4)(tokens))[..., : SMALL.vocab_size]
  bf16_model = model_lib.create(dataclasses.replace(SMALL, dtype="bfloat16"), seed=4)
  bf16 = np.asarray(bf16_model(tokens))[..., : SMALL.vocab_size]
  assert bf16.dtype == np.float32  # logits are always float32
  assert np.abs(bf16 - f32).max() < 0.05
  assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9


def test_kv_cache_prefill_then_decode_equals_full_forward():
  model = model_lib.create(SMALL, seed=5)
  tokens = np.random.default_rng(5).integers(0, SMALL.vocab_size, (2, 10))
  full = np.asarray(model(tokens))
  cache = model_lib.init_cache(SMALL, batch=2, length=16)
  h, cache = model.hidden(jnp.asarray(tokens[:, :6]), cache=cache)
  logits = lambda h: np.asarray(model_lib.logits(model.embed[...], h, SMALL.vocab_size))
  steps = [logits(h)]
  for t in range(6, 10):
    pos = jnp.full((2, 1), t, jnp.int32)
    h, cache = model.hidden(jnp.asarray(tokens[:, t:t + 1]), pos, cache=cache)
    steps.append(logits(h))
  np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat,scan_layers", [("full", True), ("save_dots", True), ("none", False),
                                               ("save_dots", False)])
def test_remat_policies_and_unrolled_layers_give_the_same_gradients(remat, scan_layers):
  tokens = np.random.default_rng(6).integers(0, SMALL.vocab_size, (2, 8))

  def grads(cfg):
    from flax import nnx
    model = model_lib.create(cfg, seed=6)
    loss = lambda m: jnp.mean(jax.nn.logsumexp(m(tokens)[..., : cfg.vocab_size], -1))
    return jax.tree.leaves(nnx.grad(loss)(model))

  for a, b in zip(grads(SMALL), grads(dataclasses.replace(SMALL, remat=remat, scan_layers=scan_layers))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_same_forward_and_loss_on_one_device_and_a_2x2x2_mesh():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in conftest.py)")
  from flax import nnx
  cfg = dataclasses.replace(SMALL, vocab_size=128, vocab_multiple=128)
  tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (4, 8))

  def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  single = model_lib.create(cfg, seed=7)
  expected_logits, expected_loss = np.asarray(single(tokens)), float(loss_fn(single, tokens))

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  graphdef, state = nnx.split(model_lib.create(cfg, seed=7))
  shardings = model_lib.param_shardings(cfg, mesh)
  state = jax.device_put(nnx.to_pure_dict(state), shardings)
  batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
  assert state["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)

  @jax.jit
  def run(state, tokens):
    model = nnx.merge(graphdef, state)
    return model(tokens), loss_fn(model, tokens)

  with sharding.activate(mesh):
    logits, loss = run(state, batch)
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits), expected_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
