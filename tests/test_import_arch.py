"""Llama-family architecture variants through the stack: checkpoints built with transformers' LlamaForCausalLM
(tied, untied, llama3 RoPE scaling with an explicit head_dim, linear scaling, sharded), imported, compared with
transformers (logits, greedy generation), fine-tuned from the run, and exported back."""

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from conftest import DPO_FILE, SFT_DIR, run_preprocess
from mimix_jax import export as export_lib, generate as generate_lib, import_hf as import_lib
from mimix_jax.hf import configs as hf_configs, files as hf_files, layout
from mimix_jax.model import rope, transformer as model_lib
from mimix_jax.model.config import ModelConfig, preset
from mimix_jax.training import checkpoints, run_dir as run_dir_lib

REPO = Path(__file__).resolve().parents[1]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # wavelengths 8 .. 32 are interpolated: all three regimes occur
VARIANTS = {
    "tied": dict(tie_word_embeddings=True),
    "untied": dict(tie_word_embeddings=False),
    "llama3_head_dim": dict(tie_word_embeddings=False, head_dim=32, rope_parameters={"rope_theta": 10000.0, **LLAMA3}),
    "linear": dict(tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}),
}


def _llama(tok, **overrides) -> transformers.LlamaForCausalLM:
  kw = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
            rms_norm_eps=1e-6, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kw, **overrides})).eval()


def _save(model, tok, out: Path, **kw) -> Path:
  """save_pretrained (float32) plus the tokenizer files our export writes (what import_hf reads)."""
  model.save_pretrained(out, **kw)
  hf_files.write_tokenizer(out, tok, max_len=128)
  return out


@pytest.fixture(scope="module")
def hf_dirs(tok, tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {name: _save(_llama(tok, **kw), tok, root / name) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def runs(hf_dirs, tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  for name, src in hf_dirs.items():
    assert import_lib.main(["--model", str(src), "--output", str(root / name)]) == 0
  return {name: root / name for name in hf_dirs}


def _tokens(vocab: int, shape=(2, 96)) -> np.ndarray:
  return np.random.default_rng(0).integers(0, vocab, shape).astype(np.int32)


def _ours(run: Path, tokens: np.ndarray) -> np.ndarray:
  info = run_dir_lib.read_run_info(run)
  model = model_lib.from_params(info.model, checkpoints.load_params(run))
  return np.asarray(model(jnp.asarray(tokens)))[..., : info.model.vocab_size]


def _theirs(hf_dir: Path, tokens: np.ndarray) -> np.ndarray:
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    return hf(torch.as_tensor(tokens).long()).logits.numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imported_variant_matches_transformers_logits(variant, hf_dirs, runs, tok):
  cfg = run_dir_lib.read_run_info(runs[variant]).model
  hf = json.loads((hf_dirs[variant] / "config.json").read_text())
  assert cfg.tie_embeddings == hf["tie_word_embeddings"]
  assert cfg.head_dim == (hf.get("head_dim") or 16) and cfg.max_position_embeddings == 128 == cfg.max_len
  assert (cfg.rope_scaling is None) == (variant in ("tied", "untied"))
  tokens = _tokens(tok.vocab_size)
  assert np.abs(_ours(runs[variant], tokens) - _theirs(hf_dirs[variant], tokens)).max() < 1e-4


@pytest.mark.parametrize("rope_parameters", [LLAMA3, {"rope_type": "linear", "factor": 4.0}])
def test_scaled_inverse_frequencies_equal_transformers(rope_parameters):
  hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128,
                                rope_parameters={"rope_theta": 500000.0, **rope_parameters})
  theirs, factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hf, "cpu")
  cfg = hf_configs.model_config_from_hf(hf.to_dict())
  ours = rope.inverse_frequencies(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
  assert factor == 1.0 and np.allclose(ours, theirs.numpy(), rtol=1e-6, atol=0)
  assert not np.allclose(ours, rope.inverse_frequencies(128, 500000.0))  # the scaling did something


@pytest.mark.parametrize("variant", ["untied", "llama3_head_dim"])
def test_greedy_generation_is_token_identical(variant, hf_dirs, runs, tok, capsys):
  prompt = "The devil is in the"
  assert generate_lib.main(["--checkpoint", str(runs[variant]), "--raw", "--prompt", prompt, "--greedy",
                            "--max_new_tokens", "16", "--json"]) == 0
  ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  ids = tok.encode(prompt, bos=True)
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[variant], dtype=torch.float32).eval()
  stops = run_dir_lib.read_run_info(runs[variant]).generation["stop_ids"]
  with torch.no_grad():
    new = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, eos_token_id=stops,
                      pad_token_id=tok.pad_id)[0, len(ids):].tolist()
  assert ours["prompt_tokens"] == len(ids)
  assert ours["tokens"] == (new[:-1] if new[-1] in stops else new) and len(new) >= 8


def test_sharded_checkpoint_imports_the_same_params_in_the_asked_dtype(hf_dirs, runs, tok, tmp_path):
  sharded = _save(_llama(tok, **VARIANTS["llama3_head_dim"]), tok, tmp_path / "sharded", max_shard_size="100KB")
  assert len(list(sharded.glob("model-*.safetensors"))) > 3
  assert import_lib.main(["--model", str(sharded), "--output", str(tmp_path / "run")]) == 0
  whole, parts = checkpoints.load_params(runs["llama3_head_dim"]), checkpoints.load_params(tmp_path / "run")
  assert all(np.array_equal(a, b) for a, b in zip(*map(lambda p: jax.tree.leaves(p), (whole, parts))))

  assert import_lib.main(["--model", str(sharded), "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
  bf16 = checkpoints.load_params(tmp_path / "bf16")  # restored as float32 for training; stored rounded
  rounded = np.asarray(whole["lm_head"]).astype(ml_dtypes.bfloat16).astype(np.float32)
  assert np.array_equal(np.asarray(bf16["lm_head"]), rounded) and not np.array_equal(rounded, whole["lm_head"])


def _fill(model_dir: Path, cfg: ModelConfig, dtype=None) -> dict:
  filler = layout.ParamFiller(cfg, dtype)
  for name, tensor in hf_files.iter_safetensors(model_dir):
    filler.add(name, tensor)
    del tensor
  return filler.result()


def test_streaming_holds_at_most_one_shard_beyond_the_result(tok, tmp_path):
  """tracemalloc sees NumPy's and safetensors' allocations: reading every shard at once would cost the whole
  checkpoint on top of the result; streaming costs less than one shard."""
  model = _llama(tok, num_hidden_layers=8, vocab_size=256, tie_word_embeddings=False)
  out = tmp_path / "hf"
  model.save_pretrained(out, max_shard_size="150KB")
  shards = sorted(out.glob("model-*.safetensors"))
  total, largest = sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards)
  assert total > 4 * largest
  cfg = hf_configs.model_config_from_hf(json.loads((out / "config.json").read_text()))

  tracemalloc.start()
  everything = dict(hf_files.iter_safetensors(out))  # the control: a full copy in host memory
  full_copy = tracemalloc.get_traced_memory()[1]
  del everything
  tracemalloc.reset_peak()
  params = _fill(out, cfg)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  result = sum(x.nbytes for x in jax.tree.leaves(params))
  assert full_copy >= total * 0.95
  assert peak - result < largest, (peak, result, largest)

  kept = _fill(_bf16_copy(model, tmp_path / "bf16"), cfg)  # dtype None keeps the checkpoint's
  assert kept["layers"]["wq"].dtype == ml_dtypes.bfloat16 and kept["final_norm"].dtype == ml_dtypes.bfloat16


def _bf16_copy(model, out: Path) -> Path:
  model.to(torch.bfloat16).save_pretrained(out)
  return out


def _finetune(stage: str, source: Path, shards: Path, workdir: Path) -> Path:
  """Three CPU-sized steps of configs/finetune.py:STAGE:SOURCE in a subprocess; returns the run dir."""
  cmd = [sys.executable, "-m", "mimix_jax.train", "--config", f"configs/finetune.py:{stage}:{source}", "--workdir",
         str(workdir), f"--config.data.train_path={shards}", "--config.max_len=64", "--config.batch_size=8",
         "--config.grad_accum_steps=1", "--config.total_steps=3", "--config.model.dtype=float32",
         "--config.model.remat=none", "--config.loss_chunk=0", "--config.optimizer.lr=1e-3",
         "--config.optimizer.warmup_steps=1", "--config.log_every=1", "--config.save_every_steps=3"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 3 and all(np.isfinite(losses))
  return workdir


@pytest.mark.slow
def test_dpo_from_the_imported_untied_run_then_chat_mode_generation(runs, tok, tmp_path, capsys):
  """DPO (the reference log-probs through lm_head too) from the import, then greedy chat-mode generation."""
  run = runs["llama3_head_dim"]
  shards = tmp_path / "dpo"
  assert run_preprocess(run / "tokenizer", shards, "dpo", [DPO_FILE], 64) == 0
  dpo = _finetune("dpo", run, shards, tmp_path / "dpo_run")
  metrics = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(m["rewards/margins"]) for m in metrics)
  assert run_dir_lib.read_run_info(dpo).generation["mode"] == "chat"
  assert generate_lib.main(["--checkpoint", str(dpo), "--prompt", "Hello", "--greedy", "--max_new_tokens", "8",
                            "--json"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt_tokens"] > 2


def test_finetune_the_imported_run_then_export_loads_in_transformers(hf_dirs, runs, tok, tmp_path):
  """SFT steps from the untied llama3 run via configs/finetune.py (architecture from its model.json), on data
  preprocessed with the run's tokenizer; the export holds lm_head.weight and the rope fields, and transformers
  gives our logits."""
  run = runs["llama3_head_dim"]
  shards = tmp_path / "sft"
  assert run_preprocess(run / "tokenizer", shards, "sft", [SFT_DIR / "chatterbot_en.jsonl.gz"], 64) == 0
  sft = _finetune("sft", run, shards, tmp_path / "sft_run")
  before, after = checkpoints.load_params(run), checkpoints.load_params(sft)
  assert not np.array_equal(before["lm_head"], after["lm_head"])

  exported = tmp_path / "export"
  assert export_lib.main(["--checkpoint", str(sft), "--output", str(exported)]) == 0  # verifies, too
  config = json.loads((exported / "config.json").read_text())
  assert config["tie_word_embeddings"] is False and config["head_dim"] == 32
  assert config["rope_parameters"] == {"rope_theta": 10000.0, **LLAMA3}
  assert config["max_position_embeddings"] == 128
  tokens = _tokens(tok.vocab_size, (2, 64))
  assert np.abs(_ours(sft, tokens) - _theirs(exported, tokens)).max() < 1e-4


def test_mimixlm_export_refuses_what_the_original_cannot_hold(runs, tmp_path, capsys):
  code = export_lib.main(["--checkpoint", str(runs["untied"]), "--output", str(tmp_path / "x"), "--format",
                          "mimixlm", "--no-verify"])
  err = capsys.readouterr().err
  assert code == 2 and "tie_embeddings" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_open_model_presets_and_defaults():
  """The presets' counts are those of the published checkpoints; defaults keep today's model."""
  assert preset("smollm2_360m").param_count() == 361_821_120
  assert preset("llama3_2_1b").param_count() == 1_235_814_400
  large = preset("large")
  assert large.param_count() == 353_502_208 and large.tie_embeddings and large.rope_scaling is None
  assert large.head_dim == 128 and large.max_positions == large.max_len and large.max_position_embeddings == 0
  untied = ModelConfig(tie_embeddings=False)
  assert untied.param_count() - large.param_count() == large.vocab_size * large.d_model
  assert untied.flops_per_token(1024) == large.flops_per_token(1024)  # the lookup is no matmul; the head is one
  with pytest.raises(ValueError, match="max_position_embeddings"):
    ModelConfig(max_len=4096, max_position_embeddings=2048)
  with pytest.raises(ValueError, match="rope_scaling.type 'yarn'"):
    ModelConfig(rope_scaling={"type": "yarn", "factor": 2.0})


def test_untied_scaled_model_trains_the_same_on_one_device_and_a_2x2x2_mesh():
  """The fused loss reaches lm_head (not the embedding) and its sharding rules hold it like the embedding."""
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in conftest.py)")
  from mimix_jax.model import sharding
  from mimix_jax.training.losses import lm_loss
  cfg = ModelConfig(vocab_size=128, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, max_len=16,
                    head_dim=16, tie_embeddings=False, rope_base=1e4, scan_layers=False,
                    rope_scaling=dict(type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8))
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((8, 16), np.int32),
               segment_ids=np.ones((8, 16), np.int32), positions=np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)))

  def grads(params, batch):
    return jax.grad(lambda p: lm_loss(model_lib.from_params(cfg, p), batch, chunk=8)[0])(params)

  params = model_lib.init_params(cfg, seed=3)
  expected = grads(params, batch)
  assert float(jnp.abs(expected["lm_head"]).sum()) > 0
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  shardings = model_lib.param_shardings(cfg, mesh)
  assert shardings["lm_head"].spec == shardings["embed"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  with sharding.activate(mesh):
    got = jax.jit(grads)(jax.device_put(params, shardings),
                         jax.device_put(batch, sharding.batch_sharding(mesh)))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_init_from_an_imported_run_with_another_architecture_is_refused_in_one_line(runs, tmp_path):
  """configs/tiny.py's model is tied and unscaled: it cannot start from the untied llama3 run."""
  out = subprocess.run([sys.executable, "-m", "mimix_jax.train", "--config", "configs/tiny.py:sft", "--workdir",
                        str(tmp_path / "w"), f"--config.init_from={runs['llama3_head_dim']}", "--config.tokenizer_path="],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  err = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(err) == 1 and "configs/finetune.py:STAGE:" in err[0], out.stderr[-1000:]
  assert not (tmp_path / "w").exists()
