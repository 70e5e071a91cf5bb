"""Import a local Hugging Face Llama-architecture checkpoint as a run directory.

    python -m mimix_jax.import_hf --model HF_DIR --output RUN_DIR [--overwrite]

HF_DIR needs config.json (LlamaForCausalLM with tied embeddings, unscaled RoPE, no biases: anything else is
rejected with a message naming the field), safetensors weights (model.safetensors, or shards listed in
model.safetensors.index.json; any float dtype) and a sentencepiece `tokenizer.model` that holds our special
tokens (<|begin_of_text|> ... <|pad_id|>), as every export of ours does.

RUN_DIR gets model.json, tokenizer/ and a params-only checkpoint at step 0, so train (init_from), generate, chat
and evaluate use it directly. The run directory appears only once it is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mimix_jax import checkpoint as ckpt
from mimix_jax import hf_format
from mimix_jax import io_utils
from mimix_jax import tokenizer as tokenizer_lib
from mimix_jax.hf_format import UnsupportedConfig
from mimix_jax.model_config import ModelConfig


def import_hf(model_dir: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
  """Converts HF_DIR into RUN_DIR (see the module docstring); returns a summary."""
  model_dir = Path(model_dir)
  config_path = model_dir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
  cfg = hf_format.model_config_from_hf(json.loads(config_path.read_text()))
  tensors = read_safetensors(model_dir)
  _check_tied(tensors)
  params = hf_format.from_hf_state_dict(tensors, cfg)
  with io_utils.atomic_output_dir(output, overwrite=overwrite) as tmp:
    tok = write_tokenizer_dir(model_dir, tmp / "tokenizer", cfg)
    ckpt.write_run_info(tmp, cfg, tmp / "tokenizer", generation_defaults(model_dir, tok))  # the tokenizer stays
    ckpt.save_params(tmp, 0, params)
  return {"model": str(model_dir), "output": str(output), "n_params": cfg.param_count(), "config": cfg.to_dict()}


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
  """All tensors of model.safetensors or of the shards its index lists, as NumPy arrays (bf16 via ml_dtypes)."""
  from safetensors import safe_open

  index = model_dir / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (model_dir / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors weights are read)")
  tensors = {}
  for name in files:
    with safe_open(model_dir / name, framework="numpy") as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key)
  return tensors


def _check_tied(tensors: dict[str, np.ndarray]) -> None:
  """A tied checkpoint may still store lm_head.weight; it must then be the embedding."""
  head = tensors.get(hf_format.HF_LM_HEAD)
  if head is not None and not np.array_equal(head, tensors.get(hf_format.HF_EMBED)):
    raise UnsupportedConfig(f"{hf_format.HF_LM_HEAD} differs from {hf_format.HF_EMBED}: an untied output "
                            "head is not supported (tie_word_embeddings)")


def write_tokenizer_dir(model_dir: Path, out_dir: Path, cfg: ModelConfig) -> tokenizer_lib.Tokenizer:
  """Our tokenizer directory (tokenizer.model + tokenizer_config.json) from HF_DIR's sentencepiece model.

  Our own exports carry the original config (MIMIX_TOKENIZER_CONFIG), copied verbatim so the tokenizer hash is
  unchanged. Otherwise it is rebuilt: special-token ids looked up by their text, the reserved slots being the
  run of <|reserved_special_token_k|> pieces.
  """
  import sentencepiece as spm

  model_path = model_dir / tokenizer_lib.MODEL_FILE
  if not model_path.is_file():
    raise UnsupportedConfig(f"{model_dir}: no sentencepiece {tokenizer_lib.MODEL_FILE}; only sentencepiece "
                            "tokenizers with our special tokens can be imported (mimix_jax.tokenizer cannot use a "
                            "tokenizer.json-only tokenizer)")
  sp = spm.SentencePieceProcessor(model_file=str(model_path))
  if sp.get_piece_size() != cfg.vocab_size:
    raise UnsupportedConfig(f"vocab_size={cfg.vocab_size} in config.json, but {tokenizer_lib.MODEL_FILE} has "
                            f"{sp.get_piece_size()} pieces: they must be equal")
  out_dir.mkdir(parents=True)
  shutil.copyfile(model_path, out_dir / tokenizer_lib.MODEL_FILE)
  ours = model_dir / hf_format.MIMIX_TOKENIZER_CONFIG
  if ours.is_file():
    shutil.copyfile(ours, out_dir / tokenizer_lib.CONFIG_FILE)
  else:
    io_utils.write_json(out_dir / tokenizer_lib.CONFIG_FILE, _tokenizer_config(sp))
  return tokenizer_lib.Tokenizer.load(out_dir)  # checks every special id against the model


def _tokenizer_config(sp) -> dict[str, Any]:
  """tokenizer_config.json for a sentencepiece model that holds our named specials."""
  specials = {}
  for role, text in tokenizer_lib.NAMED_SPECIALS.items():
    idx = sp.piece_to_id(text)
    if sp.id_to_piece(idx) != text:
      raise UnsupportedConfig(f"{tokenizer_lib.MODEL_FILE} has no {text} piece ({role}); the chat format and "
                              "stop tokens need all of " + " ".join(tokenizer_lib.NAMED_SPECIALS.values()))
    specials[role] = [text, idx]
  first = sp.piece_to_id("<|reserved_special_token_0|>")
  n_reserved = 0
  while (first + n_reserved < sp.get_piece_size()
         and sp.id_to_piece(first + n_reserved) == f"<|reserved_special_token_{n_reserved}|>"):
    n_reserved += 1
  return {
      "tokenizer": "sentencepiece-bpe",
      "vocab_size": sp.get_piece_size(),
      "chat_template": tokenizer_lib.CHAT_TEMPLATE,
      "special_tokens": specials,
      "reserved_special_tokens": [first, n_reserved],
      "stop_ids": [specials["eos"][1], specials["eot"][1]],
  }


def generation_defaults(model_dir: Path, tok: tokenizer_lib.Tokenizer) -> dict[str, Any]:
  """The run's generation settings: our export's own (export.json), else generation_config.json's sampling
  values and stop ids on top of the defaults."""
  report = model_dir / "export.json"
  if report.is_file() and json.loads(report.read_text()).get("generation"):
    return json.loads(report.read_text())["generation"]
  gen = dict(ckpt.DEFAULT_GENERATION)
  path = model_dir / "generation_config.json"
  hf = json.loads(path.read_text()) if path.is_file() else {}
  for name in ("temperature", "top_p", "top_k", "max_new_tokens"):  # same names and meaning in both
    if hf.get(name) is not None:
      gen[name] = hf[name]
  eos = hf.get("eos_token_id")
  extra = [eos] if isinstance(eos, int) else list(eos or [])
  gen["stop_ids"] = list(dict.fromkeys([*tok.stop_ids, *extra]))
  return gen


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mimix_jax.import_hf", description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="a local Hugging Face model directory")
  p.add_argument("--output", required=True, help="the run directory to create")
  p.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")
  args = p.parse_args(argv)
  try:
    summary = import_hf(args.model, args.output, args.overwrite)
  except (UnsupportedConfig, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"import_hf: error: {e}", file=sys.stderr)
    return 1
  print(f"imported {summary['n_params']:,} params from {args.model} into {args.output} (checkpoint step 0)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
