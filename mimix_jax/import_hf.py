"""Import a local Hugging Face Llama-architecture checkpoint as a run directory.

    python -m mimix_jax.import_hf --model HF_DIR --output RUN_DIR [--format hf|mimixlm]
        [--dtype keep|float32|bfloat16] [--max_len N] [--overwrite]

HF_DIR needs config.json (LlamaForCausalLM: tied or untied head, any rope_theta, rope_scaling none / linear /
llama3, any head_dim; no biases, sliding windows, experts or other rope types: those are rejected with a message
naming the field), safetensors weights (model.safetensors, or shards listed in model.safetensors.index.json; any
float dtype, read one shard and one tensor at a time, so host memory holds one tensor beyond the result) and a
tokenizer, picked by the files present (TOKENIZERS): a sentencepiece `tokenizer.model` holding our special
tokens (<|begin_of_text|> ... <|pad_id|>), as our exports have, else the model's `tokenizer.json` (with its
tokenizer_config.json's Jinja chat template, special tokens and generation_config.json's stop ids: hf/bpe.py).

With --format mimixlm, HF_DIR is the original MimixLM's model folder instead: model_config.json, model_weights*
(torch state dicts) and its tokenizer.model, a BPE rank file (or our sentencepiece model, in our own
--format mimixlm exports).

RUN_DIR gets model.json, tokenizer/ and a params-only checkpoint at step 0, so train (init_from), generate, chat
and evaluate use it directly. The run directory appears only once it is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from mimix_jax import io_utils
from mimix_jax.hf import bpe, configs, files, layout, mimixlm
from mimix_jax.hf.configs import UnsupportedConfig
from mimix_jax.hf.tokenizer import MIMIX_TOKENIZER_CONFIG, write_tokenizer_dir
from mimix_jax.text import tokenizer as tokenizer_lib
from mimix_jax.training import checkpoints, run_dir

WEIGHT_DTYPES = {"keep": None, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# The default context of an imported run: chat and generate size their KV cache by it, and a 128k-position
# checkpoint (Llama 3.2) would need GiBs of cache for every conversation. --max_len chooses another.
DEFAULT_MAX_LEN = 8192


def import_hf(model_dir: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False,
              dtype: str = "float32", max_len: int = 0) -> dict[str, Any]:
  """Converts HF_DIR into RUN_DIR (see the module docstring); returns a summary.

  dtype: "keep" (the checkpoint's), "float32" or "bfloat16" for the stored params; max_len: the run's context
  (0: the checkpoint's max_position_embeddings, at most DEFAULT_MAX_LEN).
  """
  if dtype not in WEIGHT_DTYPES:
    raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(WEIGHT_DTYPES)}")
  model_dir = Path(model_dir)
  config_path = model_dir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
  cfg = configs.model_config_from_hf(json.loads(config_path.read_text()))
  context = max_len or min(cfg.max_position_embeddings, DEFAULT_MAX_LEN)
  if not 0 < context <= cfg.max_position_embeddings:
    raise ValueError(f"--max_len {max_len}: must be in [1, {cfg.max_position_embeddings}] (max_position_embeddings)")
  cfg = dataclasses.replace(cfg, max_len=context)
  _check_hashes(model_dir)
  filler = layout.ParamFiller(cfg, WEIGHT_DTYPES[dtype])
  for name, tensor in files.iter_safetensors(model_dir):
    filler.add(name, tensor)
    del tensor  # only the result stays
  params = filler.result()
  with io_utils.atomic_output_dir(output, overwrite=overwrite) as tmp:
    tok = _tokenizer_writer(model_dir)(model_dir, tmp / "tokenizer", cfg.vocab_size)
    run_dir.write_run_info(tmp, cfg, tmp / "tokenizer", generation_defaults(model_dir, tok))  # the tokenizer stays
    checkpoints.save_params(tmp, 0, params)
  return {"model": str(model_dir), "output": str(output), "n_params": cfg.param_count(), "config": cfg.to_dict()}


def _our_sentencepiece(model_dir: Path) -> bool:
  """A sentencepiece tokenizer.model holding our specials (an export of ours, maybe without its config)."""
  import sentencepiece as spm

  try:
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / tokenizer_lib.MODEL_FILE))
  except (OSError, RuntimeError):  # not a sentencepiece model (e.g. a tiktoken file)
    return False
  bos = tokenizer_lib.NAMED_SPECIALS["bos"]
  return sp.id_to_piece(sp.piece_to_id(bos)) == bos


# Which tokenizer a model directory has, in order of preference (the test on its files), and what imports it.
TOKENIZERS = (
    (lambda d: (d / MIMIX_TOKENIZER_CONFIG).is_file(), write_tokenizer_dir),
    (lambda d: (d / tokenizer_lib.MODEL_FILE).is_file() and _our_sentencepiece(d), write_tokenizer_dir),
    (lambda d: (d / "tokenizer.json").is_file(), bpe.write_tokenizer_json_dir),
    (lambda d: (d / tokenizer_lib.MODEL_FILE).is_file(), write_tokenizer_dir),  # refused, naming what it lacks
)


def _tokenizer_writer(model_dir: Path):
  for present, writer in TOKENIZERS:
    if present(model_dir):
      return writer
  raise FileNotFoundError(f"{model_dir}: no tokenizer.json or tokenizer.model (the model's tokenizer is needed)")


def import_mimixlm(folder: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False,
                   dtype: str = "float32", max_len: int = 0) -> dict[str, Any]:
  """Converts the original's model folder into RUN_DIR; returns a summary. dtype as import_hf's; max_len 0 keeps
  the folder's."""
  folder = Path(folder)
  config = mimixlm.read_config(folder)
  cfg = mimixlm.model_config(config)
  if not 0 <= max_len <= cfg.max_len:
    raise ValueError(f"--max_len {max_len}: must be in [1, {cfg.max_len}] (the folder's max_len)")
  cfg = dataclasses.replace(cfg, max_len=max_len or cfg.max_len)
  filler = layout.ParamFiller(cfg, WEIGHT_DTYPES[dtype])
  for name, tensor in mimixlm.read_weights(folder).items():
    filler.add(name, tensor)
  params = filler.result()
  original_tok = config["tokenizer_config"]
  with io_utils.atomic_output_dir(output, overwrite=overwrite) as tmp:
    if original_tok.get("tokenizer") == "sentencepiece-bpe":  # our own --format mimixlm export
      (tmp / "tokenizer").mkdir()
      io_utils.write_json(tmp / "tokenizer" / tokenizer_lib.CONFIG_FILE, original_tok)
      shutil.copyfile(folder / tokenizer_lib.MODEL_FILE, tmp / "tokenizer" / tokenizer_lib.MODEL_FILE)
      tok = tokenizer_lib.Tokenizer.load(tmp / "tokenizer")
    else:
      tok = bpe.write_rank_file_dir(folder, original_tok, tmp / "tokenizer", cfg.vocab_size)
    gen = mimixlm.generation(config, run_dir.DEFAULT_GENERATION)
    gen["stop_ids"] = tokenizer_lib.stop_ids(tok, gen["stop_ids"])
    run_dir.write_run_info(tmp, cfg, tmp / "tokenizer", gen)
    checkpoints.save_params(tmp, 0, params)
  return {"model": str(folder), "output": str(output), "n_params": cfg.param_count(), "config": cfg.to_dict()}


def _check_hashes(model_dir: Path) -> None:
  """Our exports record the sha256 of every file they wrote (export.json): a damaged copy is refused."""
  report = model_dir / "export.json"
  sums = json.loads(report.read_text()).get("sha256", {}) if report.is_file() else {}
  for name, digest in sums.items():
    if not (model_dir / name).is_file():
      raise FileNotFoundError(f"{model_dir / name}: missing (export.json lists it)")
    if io_utils.sha256_file(model_dir / name) != digest:
      raise ValueError(f"{model_dir / name}: does not match the sha256 in export.json (truncated or altered "
                       "copy): export again or copy it again")


def generation_defaults(model_dir: Path, tok: tokenizer_lib.Tokenizer) -> dict[str, Any]:
  """The run's generation settings: our export's own (export.json), else generation_config.json's sampling
  values and stop ids on top of the defaults."""
  report = model_dir / "export.json"
  if report.is_file() and json.loads(report.read_text()).get("generation"):
    return json.loads(report.read_text())["generation"]
  gen = dict(run_dir.DEFAULT_GENERATION)
  path = model_dir / "generation_config.json"
  hf = json.loads(path.read_text()) if path.is_file() else {}
  for name in ("temperature", "top_p", "top_k", "max_new_tokens"):  # same names and meaning in both
    if hf.get(name) is not None:
      gen[name] = hf[name]
  eos = hf.get("eos_token_id")
  gen["stop_ids"] = tokenizer_lib.stop_ids(tok, [eos] if isinstance(eos, int) else list(eos or []))
  return gen


IMPORTERS = {"hf": import_hf, "mimixlm": import_mimixlm}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mimix_jax.import_hf", description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, help="a local Hugging Face model directory")
  p.add_argument("--output", required=True, help="the run directory to create")
  p.add_argument("--format", default="hf", choices=list(IMPORTERS),
                 help="hf: a Hugging Face model directory; mimixlm: the original MimixLM's model folder")
  p.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")
  p.add_argument("--dtype", default="float32", choices=list(WEIGHT_DTYPES),
                 help="the stored weights: the checkpoint's own dtype (keep) or cast (float32: what training keeps)")
  p.add_argument("--max_len", type=int, default=0,
                 help=f"the run's context (KV cache, RoPE table); default max_position_embeddings, at most "
                      f"{DEFAULT_MAX_LEN}")
  args = p.parse_args(argv)
  try:
    summary = IMPORTERS[args.format](args.model, args.output, args.overwrite, args.dtype, args.max_len)
  except (UnsupportedConfig, FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"import_hf: error: {e}", file=sys.stderr)
    return 2
  print(f"imported {summary['n_params']:,} params from {args.model} into {args.output} (checkpoint step 0)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
