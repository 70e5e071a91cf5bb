"""The files of a Hugging Face model directory (and of the original's model folder): writing our export, reading
a checkpoint's safetensors. NumPy in, files out; torch only for the original's `model_weights`.

Each writer returns the file names it wrote, relative to the export directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from mimix_jax import io_utils
from mimix_jax.hf import bpe, configs, layout
from mimix_jax.hf.tokenizer import MIMIX_TOKENIZER_CONFIG, chat_template, hf_tokenizer_json
from mimix_jax.model.config import ModelConfig
from mimix_jax.text import tokenizer as tokenizer_lib
from mimix_jax.text.tokenizer import Tokenizer

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
SAFETENSORS_INDEX = "model.safetensors.index.json"


def write_safetensors(out_dir: Path, tensors: dict[str, np.ndarray], dtype: str, max_shard_size: str | int) -> list[str]:
  """model.safetensors, or shards of at most max_shard_size ("5GB", "500MB", or bytes; one bigger tensor gets a
  shard of its own) and their index, split by huggingface_hub as transformers' save_pretrained splits."""
  from huggingface_hub import split_state_dict_into_shards_factory
  from safetensors.numpy import save_file

  cast = {name: np.ascontiguousarray(t.astype(DTYPES[dtype], copy=False)) for name, t in tensors.items()}
  if isinstance(max_shard_size, str) and max_shard_size.strip().isdigit():
    max_shard_size = int(max_shard_size)
  try:
    split = split_state_dict_into_shards_factory(
        cast, get_storage_size=lambda t: t.nbytes, filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size)
  except ValueError:
    raise ValueError(f"--max_shard_size {max_shard_size!r}: expected a number of bytes or a size such as 500MB or 5GB"
                     ) from None
  metadata = {"format": "pt"}  # transformers refuses safetensors files without it
  for fname, names in split.filename_to_tensors.items():
    save_file({name: cast[name] for name in names}, out_dir / fname, metadata=metadata)
    io_utils.honour_umask(out_dir / fname)  # safetensors writes through a private 0600 temporary
  files = list(split.filename_to_tensors)
  if split.is_sharded:
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    io_utils.write_json(out_dir / SAFETENSORS_INDEX, index)
    files.append(SAFETENSORS_INDEX)
  return files


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
  """(name, tensor) of model.safetensors or of the shards its index lists, one tensor read at a time from one
  open shard at a time, as NumPy arrays (bf16 via ml_dtypes): the caller converts and drops each, so a large
  checkpoint never sits in host memory whole."""
  from safetensors import safe_open

  index = model_dir / SAFETENSORS_INDEX
  if index.is_file():
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (model_dir / "model.safetensors").is_file():
    names = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or {SAFETENSORS_INDEX} (only safetensors weights "
                            "are read)")
  for name in names:
    if not (model_dir / name).is_file():
      raise FileNotFoundError(f"{model_dir / name}: missing ({SAFETENSORS_INDEX} lists it)")
    with safe_open(model_dir / name, framework="numpy") as f:
      for key in f.keys():
        yield key, f.get_tensor(key)


def write_hf_config(out_dir: Path, cfg: ModelConfig, tok: Tokenizer, generation: dict[str, Any],
                    dtype: str) -> list[str]:
  """config.json and generation_config.json."""
  io_utils.write_json(out_dir / "config.json", configs.hf_config(cfg, tok.bos_id, tok.eos_id, tok.pad_id, dtype))
  gen = {
      "bos_token_id": tok.bos_id,
      "eos_token_id": tokenizer_lib.stop_ids(tok, generation.get("stop_ids") or []),
      "pad_token_id": tok.pad_id,
      "do_sample": True,
      "temperature": generation["temperature"],
      "top_p": generation["top_p"],
      "top_k": generation["top_k"],  # 0 = off, as here (transformers' own default would be 50)
      "max_new_tokens": generation["max_new_tokens"],
  }
  io_utils.write_json(out_dir / "generation_config.json", gen)
  return ["config.json", "generation_config.json"]


def special_texts(tok: Tokenizer) -> dict[str, str]:
  """role (bos, eos, eot, start_header, end_header, pad) -> token text."""
  return {role: tok.special_tokens[role][0] for role in tokenizer_lib.NAMED_SPECIALS}


def _hf_tokenizer_config(names: dict[str, str], max_len: int) -> dict[str, Any]:
  """tokenizer_config.json for a tokenizer.json we write, with our chat template in Jinja."""
  return {
      # The generic class loads tokenizer.json as written, in transformers 4.x and 5.x, with no custom code.
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": names["bos"],
      "eos_token": names["eos"],
      "pad_token": names["pad"],
      "model_max_length": max_len,
      "clean_up_tokenization_spaces": False,
      "chat_template": chat_template(names),
  }


def write_tokenizer(out_dir: Path, tok: Tokenizer, max_len: int) -> list[str]:
  """tokenizer.json, tokenizer_config.json (with the chat template), and our originals: tokenizer.model and
  our tokenizer_config.json as MIMIX_TOKENIZER_CONFIG (for import_hf)."""
  sp_model = Path(tok.model_path).read_bytes()
  names = special_texts(tok)
  io_utils.write_json(out_dir / "tokenizer.json", hf_tokenizer_json(sp_model, names["bos"]))
  io_utils.write_json(out_dir / "tokenizer_config.json", _hf_tokenizer_config(names, max_len))
  (out_dir / "tokenizer.model").write_bytes(sp_model)
  shutil.copyfile(Path(tok.model_path).parent / tokenizer_lib.CONFIG_FILE, out_dir / MIMIX_TOKENIZER_CONFIG)
  return ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", MIMIX_TOKENIZER_CONFIG]


def write_model_tokenizer(out_dir: Path, tok: Tokenizer, max_len: int) -> list[str]:
  """A tokenizer.json run's tokenizer as it was imported (hf/bpe.py)."""
  return bpe.write_model_tokenizer(out_dir, tok)


def write_rank_file_tokenizer(out_dir: Path, tok: Tokenizer, max_len: int) -> list[str]:
  """A rank-file run's tokenizer as tokenizer.json (the same byte-level BPE) with our chat template."""
  ranks, pat_str = bpe.rank_file_of(tok)
  names = special_texts(tok)
  specials = {text: idx for text, idx in tok.special_tokens.values()}
  io_utils.write_json(out_dir / "tokenizer.json", bpe.tokenizer_json_from_ranks(ranks, pat_str, specials, names["bos"]))
  config = _hf_tokenizer_config(names, max_len)
  io_utils.write_json(out_dir / "tokenizer_config.json", config)
  return ["tokenizer.json", "tokenizer_config.json"]


# How each backend's tokenizer is written into an HF export.
TOKENIZER_WRITERS = {"sentencepiece-bpe": write_tokenizer, "tokenizer.json": write_model_tokenizer,
                     "bpe": write_rank_file_tokenizer}


def write_mimixlm(out_dir: Path, params: dict, cfg: ModelConfig, tok: Tokenizer, generation: dict[str, Any],
                  dtype: str, name: str) -> tuple[list[str], str | None]:
  """The original's model folder: `model_weights` (torch.save of its state_dict names and [out, in] shapes,
  RoPE buffer included), `model_config.json`, and `tokenizer.model`: the original's BPE rank file where the
  run's tokenizer is a byte-level BPE (checked to encode as ours), else our sentencepiece model. Returns the
  files and, for the latter, what the original cannot do with it."""
  try:
    import torch
  except ImportError:
    raise RuntimeError("--format mimixlm writes a torch state dict and needs torch (pip install -e '.[torch]')")
  out_dir.mkdir()
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  tensors = layout.to_torch_state_dict(params, cfg, "mimixlm")
  torch.save({k: torch.tensor(v, dtype=torch_dtype) for k, v in tensors.items()}, out_dir / "model_weights")
  rank_file, note = bpe.rank_file_of(tok), None
  if isinstance(rank_file, tuple):
    ranks, pat_str = rank_file
    tokenizer_config = bpe.original_tokenizer_config(tok, pat_str, len(ranks))
    bpe.write_checked_rank_file(out_dir / "tokenizer.model", ranks, tokenizer_config, tok)
  else:
    tokenizer_config = tok.config
    shutil.copyfile(tok.model_path, out_dir / "tokenizer.model")
    note = (f"mimixlm/tokenizer.model is our sentencepiece model: {rank_file}. The original's load_model() reads "
            "the weights (its forward pass gives our logits), but its load_tokenizer() knows only its BPE rank "
            "files, so its chat/generate CLI cannot run with this tokenizer")
  config = configs.mimixlm_config(cfg, tokenizer_config, generation, dtype, model_name=name)
  io_utils.write_text(out_dir / "model_config.json", json.dumps(config, indent=4, ensure_ascii=False) + "\n")
  return ["mimixlm/model_weights", "mimixlm/model_config.json", "mimixlm/tokenizer.model"], note
