"""Grain pipeline over real shards: batch contents, global shuffle, process sharding, exact resume, eval padding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from etils import epath

from mimix_jax.data.pipeline import make_iterator
from mimix_jax.data.shards import read_manifest
from mimix_jax.data.pipeline import prefetch_to_device
from mimix_jax.data.shards import ShardSource

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "index")


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(KEYS) == set(y)
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_pretrain_batches_hold_shifted_rows_with_document_masks(tok, pretrain_shards):
  src = ShardSource(pretrain_shards)
  T = read_manifest(pretrain_shards)["max_len"]
  batch = next(make_iterator(str(pretrain_shards), stage="pretrain", global_batch_size=8, seed=0))
  assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
      "inputs": ("int32", (8, T)), "targets": ("int32", (8, T)), "loss_mask": ("float32", (8, T)),
      "segment_ids": ("int32", (8, T)), "positions": ("int32", (8, T)), "index": ("int64", (8,))}
  for row in range(8):
    record = src[int(batch["index"][row])]
    np.testing.assert_array_equal(batch["inputs"][row], record["tokens"][:-1])
    np.testing.assert_array_equal(batch["targets"][row], record["tokens"][1:])
  # Over the whole dataset: no target is a bos (the next document) or padding; positions restart per segment.
  it = make_iterator(str(pretrain_shards), stage="pretrain", global_batch_size=16, seed=0, num_epochs=1,
                     shuffle=False, drop_remainder=False)
  n_boundaries = 0
  for b in it:
    trained = b["loss_mask"] == 1
    assert not np.any(trained & ((b["targets"] == tok.bos_id) | (b["targets"] == tok.pad_id)))
    assert np.all(trained == ((b["segment_ids"] != 0) & (b["targets"] != tok.bos_id) & (b["targets"] != tok.pad_id)))
    starts = np.ones_like(b["segment_ids"], bool)
    starts[:, 1:] = b["segment_ids"][:, 1:] != b["segment_ids"][:, :-1]
    assert np.all(b["positions"][starts] == 0)
    assert np.all(b["positions"][:, 1:][~starts[:, 1:]] == b["positions"][:, :-1][~starts[:, 1:]] + 1)
    n_boundaries += int(np.sum((b["targets"] == tok.bos_id) & (b["segment_ids"] != 0)))
  assert n_boundaries == 1  # two books: one document boundary inside a row


def test_sft_batches_train_exactly_the_reference_pairs(tok, sft_shards):
  it = make_iterator(str(sft_shards), stage="sft", global_batch_size=4, seed=3)
  batch = next(it)
  for row in range(4):
    x, y, m = batch["inputs"][row], batch["targets"][row], batch["loss_mask"][row]
    n = int(np.sum(batch["segment_ids"][row] != 0))  # inputs that are real tokens
    tokens = x[:n].tolist() + ([int(y[-1])] if n == len(x) else [])  # a full row's last token is only a target
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eot_id
    text = tok.decode(tokens, skip_special=False)
    user = text.split("<|start_header_id|>user<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    answer = text.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    ref_tokens, ref_mask = tok.encode_dialog_and_targets(messages)
    assert tokens == ref_tokens
    expected = np.zeros(len(m), np.float32)
    expected[: len(ref_mask) - 1] = ref_mask[1:]
    np.testing.assert_array_equal(m, expected)
    assert np.all(y[len(tokens) - 1 :] == tok.pad_id)


def test_dpo_batches_pair_chosen_and_rejected(tok, dpo_shards):
  batch = next(make_iterator(str(dpo_shards), stage="dpo", global_batch_size=6, seed=0))
  T = read_manifest(dpo_shards)["max_len"]
  for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions"):
    assert batch[k].shape == (6, 2, T)
  assert batch["index"].shape == (6,)
  assert np.all(batch["loss_mask"].sum(-1) > 0)  # both completions are trained on in every pair
  chosen, rejected = batch["inputs"][:, 0], batch["inputs"][:, 1]
  for row in range(6):  # same prompt, different completion
    header_end = np.flatnonzero(chosen[row] == tok.end_header_id)[-1]
    np.testing.assert_array_equal(chosen[row, : header_end + 1], rejected[row, : header_end + 1])


def test_processes_read_disjoint_records_of_one_global_shuffle(pretrain_shards):
  n = len(ShardSource(pretrain_shards))
  kwargs = dict(stage="pretrain", global_batch_size=8, seed=7, num_epochs=1)
  per_process = []
  for p in range(2):
    batches = list(make_iterator(str(pretrain_shards), process_index=p, process_count=2, **kwargs))
    assert all(b["inputs"].shape[0] == 4 for b in batches)
    per_process.append(np.concatenate([b["index"] for b in batches]))
  assert len(per_process[0]) == len(per_process[1]) == (n // 2) // 4 * 4
  assert not set(per_process[0]) & set(per_process[1])
  single = np.concatenate([b["index"] for b in make_iterator(str(pretrain_shards), **kwargs)])
  merged = np.stack(per_process, 1).reshape(-1)  # process p holds records p, p + 2, ... of the global stream
  np.testing.assert_array_equal(merged, single[: len(merged)])
  assert len(set(single)) == len(single) and not np.array_equal(single, np.arange(len(single)))


def test_every_epoch_is_a_new_permutation(pretrain_shards):
  n = len(ShardSource(pretrain_shards))
  it = make_iterator(str(pretrain_shards), stage="pretrain", global_batch_size=n, seed=1)
  epochs = [next(it)["index"] for _ in range(2)]
  for e in epochs:
    assert sorted(e.tolist()) == list(range(n))
  assert not np.array_equal(epochs[0], epochs[1])
  again = make_iterator(str(pretrain_shards), stage="pretrain", global_batch_size=n, seed=1)
  np.testing.assert_array_equal(next(again)["index"], epochs[0])


def test_resume_from_saved_state_yields_identical_batches(pretrain_shards):
  kwargs = dict(stage="pretrain", global_batch_size=8, seed=5)
  it = make_iterator(str(pretrain_shards), **kwargs)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = take(it, 5)
  resumed = make_iterator(str(pretrain_shards), **kwargs)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 5), expected)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_to_device_hands_each_batch_with_the_state_after_it(pretrain_shards, depth):
  kwargs = dict(stage="pretrain", global_batch_size=8, seed=6)
  expected = take(make_iterator(str(pretrain_shards), **kwargs), 6)
  batches = prefetch_to_device(make_iterator(str(pretrain_shards), **kwargs), jax.device_put, depth)
  got = [next(batches) for _ in range(5)]
  assert_same_batches([jax.device_get(b) for b, _ in got], expected[:5])
  # The state handed with batch k resumes a fresh iterator at batch k + 1, however far the prefetch ran ahead.
  for k, (_, state) in enumerate(got):
    resumed = make_iterator(str(pretrain_shards), **kwargs)
    resumed.set_state(json.loads(state))
    assert_same_batches([next(resumed)], [expected[k + 1]])


def test_grain_orbax_checkpoint_handler_round_trips_the_iterator(pretrain_shards, tmp_path):
  kwargs = dict(stage="pretrain", global_batch_size=8, seed=4)
  it = make_iterator(str(pretrain_shards), **kwargs)
  take(it, 2)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), it)
  expected = take(it, 3)
  restored = grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), make_iterator(str(pretrain_shards), **kwargs))
  assert_same_batches(take(restored, 3), expected)


def test_worker_processes_give_the_same_batches_and_resume(pretrain_shards):
  kwargs = dict(stage="pretrain", global_batch_size=8, seed=2)
  expected = take(make_iterator(str(pretrain_shards), **kwargs), 6)
  it = make_iterator(str(pretrain_shards), worker_count=2, **kwargs)
  assert_same_batches(take(it, 4), expected[:4])
  state = it.get_state()
  it.close()
  resumed = make_iterator(str(pretrain_shards), worker_count=2, **kwargs)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 2), expected[4:])
  resumed.close()


@pytest.mark.parametrize("process_count", [1, 2])
def test_evaluation_covers_each_record_once_and_pads_the_last_batch(sft_shards, process_count):
  n = len(ShardSource(sft_shards))
  runs = [list(make_iterator(str(sft_shards), stage="sft", global_batch_size=64, seed=0, num_epochs=1, shuffle=False,
                             drop_remainder=False, process_index=p, process_count=process_count))
          for p in range(process_count)]
  assert len({len(r) for r in runs}) == 1  # every process runs the same number of steps
  index = np.concatenate([b["index"] for r in runs for b in r])
  real = index[index >= 0]
  assert sorted(real.tolist()) == list(range(n))
  if process_count == 1:
    np.testing.assert_array_equal(real, np.arange(n))  # unshuffled: in order
  pad_rows = [(b, i) for r in runs for b in r for i in np.flatnonzero(b["index"] < 0)]
  assert len(pad_rows) == len(index) - n > 0
  for b, i in pad_rows:
    assert not b["loss_mask"][i].any() and not b["segment_ids"][i].any()
  assert all(b["inputs"].shape == (64 // process_count, 128) for r in runs for b in r)


def test_bad_arguments_are_refused(pretrain_shards):
  with pytest.raises(ValueError, match="holds pretrain data, not sft"):
    make_iterator(str(pretrain_shards), stage="sft", global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match="not divisible by process_count"):
    make_iterator(str(pretrain_shards), stage="pretrain", global_batch_size=9, seed=0, process_count=2)
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    make_iterator(str(pretrain_shards / "nope"), stage="pretrain", global_batch_size=8, seed=0)


def test_bench_data_smoke(tmp_path):
  """bench/bench_data.py end to end at toy size (the real run is not part of the suite)."""
  results = tmp_path / "bench.jsonl"
  bench = Path(__file__).resolve().parents[1] / "bench" / "bench_data.py"
  proc = subprocess.run([sys.executable, str(bench), "--smoke", "--json", str(results)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in results.read_text().splitlines()]
  assert [r["bench"] for r in rows] == ["tokenizer_train", "preprocess_pretrain", "preprocess_pretrain", "loader_pretrain"]
  assert all(r.get("tokens_per_s", 1) > 0 for r in rows) and rows[1]["tokens"] == rows[2]["tokens"]
  assert "| loader (Grain, 0 workers) |" in proc.stdout
