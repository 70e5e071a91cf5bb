"""The optimizer on its own: Muon against optax.contrib.muon (a plain matrix, and each layer of a stack alone),
AdamW for the embedding and norms under Muon, and the schedules (wsd beside cosine / linear / constant)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import muon as optax_muon

from mimix_jax.model.config import ModelConfig
from mimix_jax.training import config as config_lib, optimizer

INPUT_AXES = ModelConfig(vocab_size=64, n_layers=3, d_model=16, n_heads=4, n_kv_heads=2, d_ff=24,
                         max_len=8).projection_input_axes()
STEPS = 4


def muon_opt(**overrides):
  opt = config_lib.defaults().optimizer
  opt.update({"name": "muon", "clip_norm": 0.0, "warmup_steps": 1, "muon_weight_decay": 0.1, "weight_decay": 0.1,
              **overrides})
  return opt


def updates_over_steps(tx, params, grads_per_step):
  """The update of each step, applied as training applies them."""
  state, out, update = tx.init(params), [], jax.jit(tx.update)
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def stacked_params(seed=0):
  shapes = {"embed": (64, 16), "final_norm": (16,),
            "layers": {"wq": (3, 16, 4, 4), "wo": (3, 4, 4, 16), "w_down": (3, 24, 16), "attn_norm": (3, 16)}}
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, s) * 0.1 for k, s in zip(keys, leaves)])


def grads_like(params, steps=STEPS, seed=1):
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for s in range(steps):
    keys = jax.random.split(jax.random.key(seed * 1000 + s), len(leaves))
    out.append(jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  return out


def reference_muon(opt, total_steps):
  """optax.contrib.muon as shipped, for 2-D params, with our Muon fields and schedule."""
  return optax_muon(learning_rate=optimizer.schedule(opt, total_steps, peak=opt.muon_lr), beta=opt.muon_momentum,
                    ns_steps=opt.muon_ns_steps, weight_decay=opt.muon_weight_decay)


def test_muon_update_equals_optax_contrib_muon_on_a_plain_matrix():
  opt = muon_opt()
  w = jax.random.normal(jax.random.key(0), (1, 16, 24)) * 0.1  # a one-layer stack of w_gate [d, F]
  grads = jax.random.normal(jax.random.key(1), (STEPS, 1, 16, 24))
  ours = updates_over_steps(optimizer.make(opt, 10, INPUT_AXES), {"layers": {"w_gate": w}},
                            [{"layers": {"w_gate": g}} for g in grads])
  theirs = updates_over_steps(reference_muon(opt, 10), {"w": w[0]}, [{"w": g[0]} for g in grads])
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a["layers"]["w_gate"][0], b["w"], rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(ours[-1]["layers"]["w_gate"]).max()) > 0


def test_each_stacked_layer_gets_the_update_that_layer_alone_would_get():
  opt = muon_opt()
  params = stacked_params()
  grads = grads_like(params)
  ours = updates_over_steps(optimizer.make(opt, 10, INPUT_AXES), params, grads)
  matrix = {"wq": lambda x: x.reshape(16, 16), "wo": lambda x: x.reshape(16, 16), "w_down": lambda x: x}
  for name, as_matrix in matrix.items():
    for layer in range(3):
      alone = updates_over_steps(reference_muon(opt, 10), {"w": as_matrix(params["layers"][name][layer])},
                                 [{"w": as_matrix(g["layers"][name][layer])} for g in grads])
      for step, (a, b) in enumerate(zip(ours, alone)):
        np.testing.assert_allclose(as_matrix(a["layers"][name][layer]), b["w"], rtol=1e-5, atol=1e-7,
                                   err_msg=f"{name} layer {layer} step {step}")
  # Orthogonalising the whole stack (or wq as [d, H, D] per head) would not give this: the layers differ.
  assert not np.allclose(ours[0]["layers"]["wq"][0], ours[0]["layers"]["wq"][1])


def test_embedding_and_norms_get_adamw_updates_under_muon():
  opt = muon_opt()
  params = stacked_params()
  grads = grads_like(params)
  ours = updates_over_steps(optimizer.make(opt, 10, INPUT_AXES), params, grads)
  rest = lambda tree: {"embed": tree["embed"], "final_norm": tree["final_norm"],
                       "layers": {"attn_norm": tree["layers"]["attn_norm"]}}
  adamw = optimizer.make(muon_opt(name="adamw"), 10, INPUT_AXES)  # the same fields, AdamW alone on those params
  theirs = updates_over_steps(adamw, rest(params), [rest(g) for g in grads])
  for a, b in zip(ours, theirs):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8), rest(a), b)
  # ... and with the embedding and norms undecayed, as under AdamW alone.
  zero = [jax.tree.map(jnp.zeros_like, params)]
  still = updates_over_steps(optimizer.make(opt, 10, INPUT_AXES), params, zero)[0]
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(rest(still)))
  assert float(jnp.abs(still["layers"]["wq"]).max()) > 0  # Muon's own decoupled decay


def lrs(total_steps, **fields):
  opt = config_lib.defaults().optimizer
  opt.update(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, **fields)
  sched = optimizer.schedule(opt, total_steps)
  return np.array([float(sched(s)) for s in range(total_steps)])


def test_wsd_warms_up_holds_the_peak_then_decays_over_the_last_fraction_to_the_floor():
  lr = lrs(40, schedule="wsd", decay_fraction=0.25)
  assert np.all(np.diff(lr[:4]) > 0) and lr[3] == 1.0  # the peak at step warmup_steps - 1, as the others
  np.testing.assert_array_equal(lr[3:30], 1.0)  # constant until the last 10 steps
  assert np.all(np.diff(lr[29:]) < 0)
  np.testing.assert_allclose(lr[-1], 0.1, rtol=1e-6)  # the floor at total_steps, like linear's
  np.testing.assert_allclose(lr[-1], lrs(40, schedule="linear")[-1], rtol=1e-6)


def test_a_longer_wsd_run_shares_the_shorter_ones_steps_until_its_decay():
  short, longer = lrs(40, schedule="wsd", decay_fraction=0.25), lrs(100, schedule="wsd", decay_fraction=0.25)
  np.testing.assert_array_equal(short[:30], longer[:30])  # extend a run from before its decay: no re-warming
  cos_short, cos_long = lrs(40, schedule="cosine"), lrs(100, schedule="cosine")
  assert not np.allclose(cos_short[4:30], cos_long[4:30])  # cosine's every step depends on the run's length


@pytest.mark.parametrize("field,value,match", [("name", "sgd", "optimizer.name must be one of adamw, muon"),
                                               ("schedule", "step", "optimizer.schedule must be one of"),
                                               ("decay_fraction", 1.5, "decay_fraction must be between 0 and 1")])
def test_unknown_choices_are_refused_naming_the_field(field, value, match):
  opt = config_lib.defaults().optimizer
  opt[field] = value
  with pytest.raises(ValueError, match=match):
    optimizer.make(opt, 10, INPUT_AXES)
