"""The train step: overfitting, sharding invariance, gradient accumulation, checkpoints across meshes, DPO math.

Batches are real text from the shipped corpus, as byte ids (no tokenizer needed at this level).
"""

import gzip
import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from mimix_jax.model import sharding
from mimix_jax.model import transformer as model_lib
from mimix_jax.training import checkpoints, config as config_lib, losses, objectives
from mimix_jax.training.step import TrainStep

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=260, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_multiple=8,
             attention_q_block=8)
MAX_LEN = 32


def text_batch(batch: int, length: int, offset: int = 0, packed: bool = True) -> dict[str, np.ndarray]:
  """Rows of real text bytes; each row holds two documents (packed) so segment masking is exercised."""
  text = gzip.open(next((ROOT / "data/corpus/train").glob("*.gz"))).read()[10_000:]
  ids = np.frombuffer(text, np.uint8).astype(np.int32)
  rows = np.stack([ids[offset + i * (length + 1): offset + (i + 1) * (length + 1)] for i in range(batch)])
  cut = length // 3 if packed else length + 1
  segment = np.where(np.arange(length) < cut, 1, 2).astype(np.int32)
  positions = np.where(np.arange(length) < cut, np.arange(length), np.arange(length) - cut).astype(np.int32)
  mask = np.ones(length, np.float32)
  if packed:
    mask[cut - 1] = 0  # the first token of document 2 is not a target of document 1
  tile = lambda x: np.tile(x, (batch, 1))
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": tile(mask), "segment_ids": tile(segment),
          "positions": tile(positions), "index": np.arange(batch)}


def make_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = config_lib.defaults()
  cfg.model = dict(MODEL)
  cfg.max_len = MAX_LEN
  cfg.batch_size, cfg.total_steps = 8, 50
  cfg.optimizer.update(lr=3e-3, warmup_steps=2)
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return cfg


def build(cfg, mesh) -> TrainStep:
  return TrainStep(cfg, objectives.from_config(cfg), mesh)


def run_steps(cfg, mesh, batches, params=None):
  tr = build(cfg, mesh)
  with sharding.activate(mesh):
    state = tr.init_state(cfg.seed, params)
    losses_ = []
    for b in batches:
      state, m = tr(state, tr.device_batch(b))
      losses_.append(float(m["loss"]))
  return losses_, jax.tree.map(np.asarray, state["params"]), tr


def one_device_mesh():
  return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def test_tiny_model_overfits_a_small_batch():
  batch = text_batch(8, 32)
  cfg = make_cfg(total_steps=60, **{"optimizer.lr": 1e-2, "optimizer.schedule": "constant"})
  losses_, _, _ = run_steps(cfg, one_device_mesh(), [batch] * 60)
  assert losses_[0] > 4.5  # ~ln(260) at init
  assert losses_[-1] < 0.5, losses_[-5:]


@pytest.mark.parametrize("name", ["adamw", "muon"])  # muon: Newton-Schulz on matrices sharded over fsdp x tensor
def test_same_losses_and_params_on_one_device_and_a_2x2x2_mesh(name):
  if jax.device_count() < 8:
    pytest.skip("needs 8 virtual devices")
  batches = [text_batch(8, 32, offset=i * 400) for i in range(5)]
  # The loss in 4 chunks on the mesh, at once on one device.
  l1, p1, _ = run_steps(make_cfg(**{"optimizer.name": name}), one_device_mesh(), batches)
  l8, p8, _ = run_steps(make_cfg(loss_chunk=8, **{"optimizer.name": name}), sharding.make_mesh(2, 2, 2), batches)
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), p1, p8)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_gradient_accumulation_4x2_equals_batch_8(name):
  batches = [text_batch(8, 32, offset=i * 400) for i in range(3)]
  # A larger Adam eps keeps updates proportional to gradients: with eps 1e-8, Adam turns float rounding in
  # near-zero gradients into full-size sign updates, which would test rounding, not accumulation.
  fields = {"optimizer.eps": 1e-3, "optimizer.name": name}
  l1, p1, _ = run_steps(make_cfg(grad_accum_steps=1, **fields), one_device_mesh(), batches)
  l4, p4, _ = run_steps(make_cfg(grad_accum_steps=4, **fields), one_device_mesh(), batches)
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p4)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_non_finite_gradient_skips_the_update(name):
  cfg = make_cfg(**{"optimizer.name": name})
  mesh = one_device_mesh()
  tr = build(cfg, mesh)
  with sharding.activate(mesh):
    state = tr.init_state(0)
    before = jax.tree.map(np.asarray, state)
    bad = text_batch(8, 32)
    bad["loss_mask"] = bad["loss_mask"] * np.float32("nan")
    state, m = tr(state, tr.device_batch(bad))
  assert not bool(m["finite"])
  after = jax.tree.map(np.asarray, state)
  for key in ("params", "opt_state"):  # Muon's momentum and counts too
    jax.tree.map(np.testing.assert_array_equal, before[key], after[key])
  assert int(state["step"]) == 1


def test_non_finite_steps_are_counted_on_the_device_and_a_long_run_of_them_halts_the_state():
  mesh = one_device_mesh()
  tr = build(make_cfg(max_nonfinite_steps=3), mesh)
  good = text_batch(8, 32)
  bad = {**good, "loss_mask": good["loss_mask"] * np.float32("nan")}
  pattern = "gbgbbgbbb" + "gg"  # intermittent ones, then three in a row: halted, the last two do nothing
  with sharding.activate(mesh):
    state = tr.init_state(0)
    seen = []
    for kind in pattern:
      state, m = tr(state, tr.device_batch(good if kind == "g" else bad))
      seen.append((int(m["nonfinite_run"]), int(m["skipped_steps"])))
      if len(seen) == 9:
        at_halt = jax.tree.map(np.asarray, state)
  assert seen[:9] == [(0, 0), (1, 1), (0, 1), (1, 2), (2, 3), (0, 3), (1, 4), (2, 5), (3, 6)]
  jax.tree.map(np.testing.assert_array_equal, at_halt, jax.tree.map(np.asarray, state))  # frozen at step 9
  assert int(state["step"]) == 9


def test_weight_decay_skips_norms_and_embedding():
  cfg = make_cfg(**{"optimizer.lr": 1e-2, "optimizer.weight_decay": 0.5, "optimizer.clip_norm": 0.0})
  tr = build(cfg, one_device_mesh())
  zero_batch = text_batch(8, 32)
  zero_batch["loss_mask"][:] = 0  # no gradient at all: only weight decay can move params
  with sharding.activate(tr.mesh):
    state = tr.init_state(0)
    before = jax.tree.map(np.asarray, state["params"])
    state, _ = tr(state, tr.device_batch(zero_batch))
  after = jax.tree.map(np.asarray, state["params"])
  np.testing.assert_array_equal(before["embed"], after["embed"])
  np.testing.assert_array_equal(before["layers"]["attn_norm"], after["layers"]["attn_norm"])
  assert not np.array_equal(before["layers"]["wq"], after["layers"]["wq"])


def test_checkpoint_from_8_devices_restores_on_1_device_with_the_same_next_loss(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 virtual devices")
  cfg = make_cfg()
  batches = [text_batch(8, 32, offset=i * 400) for i in range(3)]
  mesh8 = sharding.make_mesh(2, 2, 2)
  tr8 = build(cfg, mesh8)
  with sharding.activate(mesh8):
    state = tr8.init_state(0)
    step8 = tr8
    for b in batches[:2]:
      state, _ = step8(state, tr8.device_batch(b))
    ckpt = checkpoints.TrainCheckpointer(tmp_path, keep=2)
    ckpt.save(2, state, b'{"position": 2}')
    ckpt.close()
    _, expected = step8(state, tr8.device_batch(batches[2]))

  mesh1 = one_device_mesh()
  tr1 = build(cfg, mesh1)
  ckpt = checkpoints.TrainCheckpointer(tmp_path, keep=2)
  step, restored, data_state = ckpt.restore_latest(tr1.abstract_state, tr1.state_shardings)
  assert data_state == b'{"position": 2}' and step == 2 == int(restored["step"])
  assert restored["params"]["embed"].sharding.device_set == {jax.devices()[0]}
  with sharding.activate(mesh1):
    _, got = tr1(restored, tr1.device_batch(batches[2]))
  np.testing.assert_allclose(float(got["loss"]), float(expected["loss"]), rtol=1e-5)


def test_impossible_layouts_are_refused_with_a_clear_message():
  if jax.device_count() < 8:
    pytest.skip("needs 8 virtual devices")
  with pytest.raises(ValueError, match="not divisible by the data-parallel size"):
    build(make_cfg(batch_size=6), sharding.make_mesh(1, 8, 1))
  with pytest.raises(ValueError, match="n_kv_heads 2 is not divisible by mesh.tensor 4"):
    build(make_cfg(), sharding.make_mesh(1, 2, 4))
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh(1, 3, 2)


# ------------------------------------------------------------------------------------------------ DPO

def numpy_dpo(policy, reference, counts, beta, label_smoothing=0.0):
  policy, reference = policy.astype(np.float64), reference.astype(np.float64)
  margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
  log_sig = lambda x: -np.log1p(np.exp(-x))
  loss = -(1 - label_smoothing) * log_sig(beta * margin) - label_smoothing * log_sig(-beta * margin)
  return loss, -policy[:, 0] / counts[:, 0]


def test_dpo_loss_matches_numpy_float64_with_padding_and_different_lengths():
  model_cfg = config_lib.model_config(make_cfg(objective="dpo"))
  policy, reference = model_lib.create(model_cfg, 1), model_lib.create(model_cfg, 2)
  b = text_batch(6, 32)
  pair = {k: np.stack([v, np.roll(v, 7, axis=0)], 1) for k, v in b.items() if k != "index"}
  # Completions of different lengths with right padding: chosen keeps the first n tokens, rejected m.
  for i, (n, m) in enumerate([(5, 9), (12, 3), (31, 20), (1, 1), (8, 8), (17, 2)]):
    for j, keep in enumerate((n, m)):
      pair["loss_mask"][i, j] = 0
      pair["loss_mask"][i, j, :keep] = 1
      pair["segment_ids"][i, j, keep:] = 0
  logp_policy, counts = losses.sequence_logps(policy, pair)
  logp_ref, _ = losses.sequence_logps(reference, pair)

  # Independent per-sequence log-prob: full logits, float64 log-softmax in NumPy.
  flat = lambda x: x.reshape(12, 32)
  logits = np.asarray(policy(flat(pair["inputs"]), flat(pair["positions"]), flat(pair["segment_ids"])), np.float64)
  logits = logits[..., : model_cfg.vocab_size]
  logsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  tok = np.take_along_axis(logsm, flat(pair["targets"])[..., None], -1)[..., 0]
  expected_logps = (tok * flat(pair["loss_mask"])).sum(-1).reshape(6, 2)
  np.testing.assert_allclose(np.asarray(logp_policy), expected_logps, rtol=1e-5, atol=1e-4)

  for ls in (0.0, 0.2):
    terms = losses.dpo_terms(logp_policy, logp_ref, counts, beta=0.1, label_smoothing=ls)
    exp_dpo, exp_sft = numpy_dpo(np.asarray(logp_policy), np.asarray(logp_ref), np.asarray(counts), 0.1, ls)
    np.testing.assert_allclose(np.asarray(terms["dpo"]), exp_dpo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(terms["sft"]), exp_sft, rtol=1e-5)
    ratio = np.asarray(logp_policy - logp_ref)
    np.testing.assert_allclose(np.asarray(terms["rewards_chosen"]), 0.1 * ratio[:, 0], rtol=1e-5, atol=1e-6)

  same = losses.dpo_terms(logp_policy, logp_policy, counts, beta=0.1)
  np.testing.assert_allclose(np.asarray(same["dpo"]), np.log(2), rtol=1e-6)
  assert np.all(np.asarray(same["rewards_chosen"]) == 0) and np.all(np.asarray(same["rewards_rejected"]) == 0)


def test_fully_truncated_pairs_give_zero_loss_not_nan():
  logps = np.array([[-3.0, -4.0], [0.0, -2.0]], np.float32)
  counts = np.array([[2.0, 3.0], [0.0, 4.0]], np.float32)  # pair 1's chosen completion was truncated away
  terms = losses.dpo_terms(logps, logps - 1, counts, beta=0.1)
  assert np.all(np.isfinite(np.asarray(terms["dpo"]))) and float(terms["valid"][1]) == 0
  assert float(terms["dpo"][1]) == 0 and float(terms["sft"][1]) == 0


def test_an_evaluation_every_step_compiles_the_eval_function_once(tmp_path, pretrain_shards, tokenizer_dir, caplog):
  from test_train import SMALL_MODEL
  from mimix_jax.training import loop
  cfg = config_lib.load("configs/tiny.py:pretrain", [
      f"--config.data.train_path={pretrain_shards}", f"--config.data.eval_path={pretrain_shards}",
      f"--config.tokenizer_path={tokenizer_dir}", "--config.init_from=", "--config.max_len=64",
      "--config.batch_size=8", "--config.total_steps=4", "--config.eval_every=1", "--config.eval_steps=2",
      "--config.log_every=1", *SMALL_MODEL])
  caplog.set_level(logging.WARNING)
  jax.config.update("jax_log_compiles", True)
  try:
    assert loop.run(loop.prepare(cfg, tmp_path / "run")) == 0
  finally:
    jax.config.update("jax_log_compiles", False)
  compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation of" in r.getMessage()]
  assert sum("jit(_loss)" in m for m in compiled) == 1, compiled
  assert sum("jit(_train_fn)" in m for m in compiled) == 1, compiled
  assert len((tmp_path / "run" / "eval.jsonl").read_text().splitlines()) == 4
