"""import_hf on Llama checkpoints built locally with transformers' own LlamaForCausalLM and save_pretrained."""

import gzip
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers

from conftest import train_tokenizer
from mimix_jax import import_hf as import_lib
from mimix_jax.hf import files as hf_files
from mimix_jax.hf.configs import UnsupportedConfig
from mimix_jax.hf.tokenizer import MIMIX_TOKENIZER_CONFIG
from mimix_jax.model import transformer as model_lib
from mimix_jax.text import tokenizer as tokenizer_lib
from mimix_jax.training import checkpoints, run_dir as run_dir_lib

BOOK = Path(__file__).resolve().parents[1] / "data" / "corpus" / "train" / "devils_dictionary.txt.gz"


def _llama_config(vocab_size: int, **overrides) -> transformers.LlamaConfig:
  """Tiny Llama: MQA (1 kv head), rope theta 10000 and eps 1e-6 (both unlike ours, so they must carry over)."""
  kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=True)
  return transformers.LlamaConfig(**{**kw, **overrides})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok") / "tokenizer"
  return tokenizer_lib.Tokenizer.load(train_tokenizer([BOOK], 900, out, "--num_special_tokens", "12"))


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
  """A bfloat16 LlamaForCausalLM saved by transformers, with our tokenizer written the way export writes it,
  minus our own tokenizer config (so import rebuilds it from the sentencepiece pieces)."""
  out = tmp_path_factory.mktemp("hf") / "llama"
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(_llama_config(tok.vocab_size)).to(torch.bfloat16)
  model.save_pretrained(out)
  hf_files.write_tokenizer(out, tok, max_len=64)
  (out / MIMIX_TOKENIZER_CONFIG).unlink()
  return out


def test_imported_llama_matches_transformers_logits(tok, hf_dir, tmp_path, capsys):
  run_dir = tmp_path / "run"
  assert import_lib.main(["--model", str(hf_dir), "--output", str(run_dir)]) == 0
  assert "imported" in capsys.readouterr().out
  info = run_dir_lib.read_run_info(run_dir)
  model = model_lib.from_params(info.model, checkpoints.load_params(run_dir))
  assert (info.model.rope_base, info.model.norm_eps, info.model.n_kv_heads) == (10000.0, 1e-6, 1)
  assert info.step_dir.name == "0"
  imported_tok = tokenizer_lib.Tokenizer.load(info.tokenizer_dir)
  assert imported_tok.special_tokens == tok.special_tokens and imported_tok.stop_ids == tok.stop_ids
  assert info.generation["stop_ids"][:2] == [tok.eos_id, tok.eot_id]

  tokens = np.random.default_rng(0).integers(0, tok.vocab_size, (2, 48)).astype(np.int32)
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.as_tensor(tokens).long()).logits.numpy()
  ours = np.asarray(model(jnp.asarray(tokens)))[..., : tok.vocab_size]
  assert np.abs(ours - theirs).max() < 1e-4


def _edit_config(hf_dir: Path, dst: Path, **changes) -> Path:
  shutil.copytree(hf_dir, dst)
  config = json.loads((dst / "config.json").read_text())
  config.update(changes)
  (dst / "config.json").write_text(json.dumps(config))
  return dst


@pytest.mark.parametrize("changes,field", [
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),  # transformers 4.x name
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}), "rope_parameters"),  # 5.x
    (dict(rope_scaling={"rope_type": "llama3", "factor": 32.0}), "rope_scaling.low_freq_factor"),  # incomplete
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),  # no lm_head.weight to untie
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="mistral"), "model_type"),
    (dict(sliding_window=4096), "sliding_window"),
    (dict(num_local_experts=8), "num_local_experts"),
    (dict(head_dim=15), "head_dim"),  # odd: no rotate-half RoPE
    (dict(head_dim=32), "_proj.weight: shape"),  # the weights are 16 per head
])
def test_unsupported_configs_are_rejected_naming_the_field(hf_dir, tmp_path, capsys, changes, field):
  src = _edit_config(hf_dir, tmp_path / "edited", **changes)
  assert import_lib.main(["--model", str(src), "--output", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("import_hf: error: ") and field in err and err.count("\n") == 1
  assert not (tmp_path / "run").exists()


def test_biases_and_untied_heads_in_the_weights_are_rejected(tok, tmp_path):
  biased = tmp_path / "biased"
  transformers.LlamaForCausalLM(_llama_config(tok.vocab_size, attention_bias=True)).save_pretrained(biased)
  hf_files.write_tokenizer(biased, tok, max_len=64)
  _edit_config(biased, tmp_path / "lying", attention_bias=False)  # the config hides the bias tensors
  with pytest.raises(UnsupportedConfig, match=r"proj\.bias"):
    import_lib.import_hf(tmp_path / "lying", tmp_path / "run")

  untied = tmp_path / "untied"
  transformers.LlamaForCausalLM(_llama_config(tok.vocab_size, tie_word_embeddings=False)).save_pretrained(untied)
  _edit_config(untied, tmp_path / "untied_claims_tied", tie_word_embeddings=True)
  with pytest.raises(UnsupportedConfig, match="lm_head.weight differs"):
    import_lib.import_hf(tmp_path / "untied_claims_tied", tmp_path / "run")


def test_tokenizer_without_our_special_tokens_is_rejected(tok, hf_dir, tmp_path):
  src = tmp_path / "plain_spm"
  shutil.copytree(hf_dir, src)
  (tmp_path / "book.txt").write_text(gzip.open(BOOK, "rt").read()[:200_000])
  spm.SentencePieceTrainer.train(input=str(tmp_path / "book.txt"), model_prefix=str(tmp_path / "plain"),
                                 vocab_size=tok.vocab_size, model_type="bpe", minloglevel=2)
  shutil.copyfile(tmp_path / "plain.model", src / "tokenizer.model")
  (src / "tokenizer.json").unlink()  # with it, the model's tokenizer.json would be imported instead
  with pytest.raises(UnsupportedConfig, match=r"no <\|begin_of_text\|> piece"):
    import_lib.import_hf(src, tmp_path / "run")
