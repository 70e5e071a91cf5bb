"""Config files: every stage loads, overrides apply with the field's type, a misspelt field fails clearly;
the dry-run planner prints the gpt_large numbers for its 8-device mesh."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mimix_jax.training import config as config_lib

REPO = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "pretrain_2048", "sft", "dpo")


@pytest.mark.parametrize("file", ["configs/gpt_large.py", "configs/tiny.py"])
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_loads_and_validates(file, stage):
  cfg = config_lib.load(f"{file}:{stage}")
  config_lib.validate(cfg)
  model = config_lib.model_config(cfg)
  assert model.max_len == cfg.max_len
  assert cfg.objective == ("pretrain" if stage.startswith("pretrain") else stage)
  if stage != "pretrain":
    assert cfg.init_from  # every later stage starts from the previous one


def test_gpt_large_is_the_reference_recipe():
  expected = {"pretrain": (1024, 1200, 100_000, 5e-4, 1000), "pretrain_2048": (2048, 600, 12_000, 5e-5, 1000),
              "sft": (2048, 600, 85_000, 3e-5, 1000), "dpo": (2048, 32, 5_700, 1e-5, 500)}
  for stage, (max_len, batch, steps, lr, warmup) in expected.items():
    c = config_lib.load(f"configs/gpt_large.py:{stage}")
    assert (c.max_len, c.batch_size, c.total_steps, c.optimizer.lr, c.optimizer.warmup_steps) == (
        max_len, batch, steps, lr, warmup)
    assert config_lib.model_config(c).param_count() == 353_502_208
  dpo = config_lib.load("configs/gpt_large.py:dpo").dpo
  assert (dpo.beta, dpo.dpo_weight, dpo.sft_weight) == (0.1, 0.1, 1.0)  # loss = sft + 0.1 * dpo


def test_overrides_apply_with_types_and_typos_fail_clearly():
  c = config_lib.load("configs/gpt_large.py:pretrain", ["--config.optimizer.lr=3e-4", "--config.batch_size=600",
                                                        "--config.model.remat=full",
                                                        "--config.optimizer.decay_norms_and_embeddings=true"])
  assert c.optimizer.lr == 3e-4 and c.batch_size == 600 and c.model.remat == "full"
  assert c.optimizer.decay_norms_and_embeddings is True
  with pytest.raises(KeyError, match="no field 'optimizer.lrr'"):
    config_lib.load("configs/tiny.py:sft", ["--config.optimizer.lrr=1"])
  with pytest.raises(KeyError, match="no field 'optimiser.lr'"):
    config_lib.load("configs/tiny.py:sft", ["--config.optimiser.lr=1"])
  with pytest.raises(ValueError, match="expected a boolean"):
    config_lib.load("configs/tiny.py:sft", ["--config.optimizer.decay_norms_and_embeddings=maybe"])
  with pytest.raises(ValueError, match="unknown stage"):
    config_lib.load("configs/tiny.py:pretrain_4096")
  with pytest.raises(ValueError, match="data.prefetch must be >= 0"):
    config_lib.validate(config_lib.load("configs/tiny.py:pretrain", ["--config.data.prefetch=-1"]))
  # The model's context is the stage's max_len: there is one field for it.
  with pytest.raises(KeyError, match="no field 'model.max_len'"):
    config_lib.load("configs/tiny.py:pretrain", ["--config.model.max_len=64"])
  with pytest.raises(ValueError, match="objective must be one of pretrain, sft, dpo"):
    config_lib.validate(config_lib.load("configs/tiny.py:pretrain", ["--config.objective=rlhf"]))
  with pytest.raises(ValueError, match="model.remat must be one of none, full, save_dots"):
    config_lib.validate(config_lib.load("configs/tiny.py:pretrain", ["--config.model.remat=fulll"]))


def test_train_command_rejects_a_misspelt_field():
  out = subprocess.run([sys.executable, "-m", "mimix_jax.train", "--config", "configs/tiny.py:pretrain",
                        "--config.optimizer.lrr=1"], capture_output=True, text=True, cwd=REPO)
  assert out.returncode != 0 and "no field 'optimizer.lrr'" in out.stderr


def test_dry_run_plans_gpt_large_on_8_devices_without_allocating():
  out = subprocess.run([sys.executable, "-m", "mimix_jax.train", "--config", "configs/gpt_large.py:pretrain",
                        "--dry_run"], capture_output=True, text=True, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  text = out.stdout
  assert "353,502,208" in text and "353,551,360" in text
  assert "(8 devices)" in text and "'fsdp': 8" in text
  assert "FLOPs per token: 2.423 GFLOP" in text and "PaLM convention" in text
  peak = float(text.split("peak ~")[1].split(" GiB")[0])
  assert 5 < peak < 80  # fits an 80 GB GPU at the configured micro-batch


@pytest.mark.parametrize("stage", ["pretrain_muon", "pretrain_2048_muon"])
def test_gpt_large_muon_variant_is_its_pretrain_stage_with_muon(stage):
  muon, reference = config_lib.load(f"configs/gpt_large.py:{stage}"), config_lib.load(
      f"configs/gpt_large.py:{stage.removesuffix('_muon')}")
  config_lib.validate(muon)
  assert reference.optimizer.name == "adamw" and muon.optimizer.name == "muon"
  changed = {k for k in muon.optimizer if muon.optimizer[k] != reference.optimizer[k]}
  assert changed <= {"name", "muon_lr"}
  assert muon.init_from == (reference.init_from + "_muon" if reference.init_from else "")
  assert {k: v for k, v in muon.items() if k not in ("optimizer", "init_from")} == {
      k: v for k, v in reference.items() if k not in ("optimizer", "init_from")}


@pytest.mark.slow
def test_dry_run_plans_gpt_large_with_muon_in_less_optimizer_memory():
  def plan(stage):
    out = subprocess.run([sys.executable, "-m", "mimix_jax.train", "--config", f"configs/gpt_large.py:{stage}",
                          "--dry_run"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("train state:"))
    return out.stdout, float(line.split(" state ")[1].split(" GiB")[0])
  text, muon_state = plan("pretrain_muon")
  _, adamw_state = plan("pretrain")
  assert "muon state" in text and "1 Muon momentum for the projection matrices" in text
  # One float32 buffer fewer for every projection weight: 24 layers x 12.6M = 302M of the 353.5M parameters.
  params = config_lib.model_config(config_lib.load("configs/gpt_large.py:pretrain"))
  per_layer = sum(np.prod(shape) for name, (shape, _) in params.layer_params().items() if not name.endswith("norm"))
  np.testing.assert_allclose(adamw_state - muon_state, params.n_layers * per_layer * 4 / 2**30, rtol=0.01)
  peak = float(text.split("peak ~")[1].split(" GiB")[0])
  assert 5 < peak < 80


def test_the_planner_counts_the_chosen_optimizers_state():
  from mimix_jax.training import planner
  plans = {name: planner.plan(config_lib.load("configs/tiny.py:pretrain", [
      f"--config.optimizer.name={name}", "--config.model.vocab_size=2000"])) for name in ("adamw", "muon")}
  params = plans["adamw"]["param_bytes_total"]
  model = config_lib.model_config(config_lib.load("configs/tiny.py:pretrain", ["--config.model.vocab_size=2000"]))
  matrices = 4 * model.n_layers * sum(np.prod(shape) for name, (shape, _) in model.layer_params().items()
                                      if name in model.projection_input_axes())
  scalars = 64  # step counts and Newton-Schulz coefficients
  assert 0 <= plans["adamw"]["opt_state_bytes_total"] - 2 * params < scalars  # Adam: mu and nu for everything
  assert 0 <= plans["muon"]["opt_state_bytes_total"] - (2 * params - matrices) < scalars  # Muon: mu only
