"""Export a checkpoint to a Hugging Face Llama directory (optionally also the MimixLM layout), verified by logits.

    python -m mimix_jax.export --checkpoint RUN_OR_STEP --output DIR [--dtype float32|bfloat16]
        [--format hf|mimixlm] [--verify/--no-verify] [--max_shard_size 5GB] [--overwrite]

OUTPUT/
  config.json                 LlamaForCausalLM, tied embeddings; field names for transformers 4.x and 5.x
  generation_config.json      stops on eos and eot; the run's sampling defaults
  model.safetensors           or model-0000k-of-0000n.safetensors + model.safetensors.index.json above the limit
  tokenizer.json              the sentencepiece BPE as a `tokenizers` BPE (same ids), specials as added tokens
  tokenizer_config.json       special tokens and the chat template (our training template, in Jinja)
  tokenizer.model             the original sentencepiece model
  mimix_tokenizer_config.json our tokenizer's config (import_hf restores the tokenizer from these two)
  export.json                 what was exported from where, and the verification numbers
  mimixlm/                    with --format mimixlm: model_weights (torch state dict, spec §2.1), model_config.json,
                              tokenizer.model (ours: sentencepiece, see hf_format.mimixlm_config)

Only the params are restored (no optimizer state), onto the default device, from a checkpoint saved on any mesh;
padded vocabulary rows are stripped. Everything is written into a temporary directory that is renamed to OUTPUT
only after verification passed, so OUTPUT is never a half-written or unverified export.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from mimix_jax import checkpoint as ckpt
from mimix_jax import hf_format
from mimix_jax import io_utils
from mimix_jax.model_config import ModelConfig
from mimix_jax import tokenizer as tokenizer_lib
from mimix_jax.tokenizer import Tokenizer

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

# Verification passes when every listed bound holds. float32 must match to rounding; bfloat16 weights move the
# logits by ~0.4% relative, so only the distributions are compared.
TOLERANCES = {
    "float32": {"max_abs_diff": 1e-3, "mean_kl": 1e-6, "top1_agreement": 0.999},
    "bfloat16": {"mean_kl": 5e-3, "top1_agreement": 0.98},
}

VERIFY_TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]
VERIFY_DIALOG = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the tallest mountain on Earth?"},
    {"role": "assistant", "content": "Mount Everest, at 8,849 metres."},
    {"role": "user", "content": "And the second tallest?"},
]


class VerificationError(RuntimeError):
  """The exported model's logits (or tokenizer) disagree with ours beyond the tolerance."""


def export(checkpoint: str | os.PathLike, output: str | os.PathLike, dtype: str = "float32", fmt: str = "hf",
           verify: bool | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False) -> dict[str, Any]:
  """Writes the export (see the module docstring) and returns the report that export.json holds.

  verify=None verifies when torch and transformers are importable. Raises VerificationError (OUTPUT untouched)
  when verification fails.
  """
  if dtype not in DTYPES:
    raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
  if fmt not in ("hf", "mimixlm"):
    raise ValueError(f"--format {fmt!r}: choose from hf, mimixlm")
  if verify is None:
    verify = _torch_available()
  elif verify and not _torch_available():
    raise RuntimeError("--verify needs torch and transformers (pip install -e '.[torch]'); or pass --no-verify")
  info = ckpt.read_run_info(checkpoint)
  # float32 compute and plain XLA attention: the reference numbers for verification, and any backend runs them.
  cfg = dataclasses.replace(info.model, dtype="float32", attention="xla", remat="none")
  tok = Tokenizer.load(info.tokenizer_dir)
  with io_utils.atomic_output_dir(output, overwrite=overwrite) as tmp:
    params = jax.tree.map(np.asarray, ckpt.load_params(checkpoint, cfg))
    state_dict = hf_format.to_torch_state_dict(params, cfg, "hf")
    n_params = int(sum(v.size for v in state_dict.values()))
    files = write_safetensors(tmp, state_dict, dtype, parse_size(max_shard_size))
    del state_dict  # a full copy of the weights: free it before verification loads two more
    files += write_hf_config(tmp, cfg, tok, info.generation, dtype)
    files += write_tokenizer(tmp, tok, cfg.max_len)
    if fmt == "mimixlm":
      files += write_mimixlm(tmp / "mimixlm", params, cfg, tok, info.generation, dtype, name=info.run_dir.name)
    report = {
        "checkpoint": str(info.step_dir),
        "output": str(output),
        "format": fmt,
        "dtype": dtype,
        "n_params": n_params,
        "files": sorted(files),
        "generation": info.generation,  # import_hf restores it
        "verify": verify_export(tmp, ckpt.params_to_model(cfg, params), tok, dtype) if verify else None,
    }
    io_utils.write_json(tmp / "export.json", report)
  return report


# ---------------------------------------------------------------------------------------------------------------
# Writers (each returns the file names it wrote, relative to the export directory)


def write_safetensors(out_dir: Path, tensors: dict[str, np.ndarray], dtype: str, max_shard_bytes: int) -> list[str]:
  """model.safetensors, or shards of at most max_shard_bytes (one bigger tensor gets a shard of its own) + index."""
  from safetensors.numpy import save_file

  cast = {name: np.ascontiguousarray(t.astype(DTYPES[dtype], copy=False)) for name, t in tensors.items()}
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in cast.items():
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  metadata = {"format": "pt"}  # transformers refuses safetensors files without it
  if len(shards) == 1:
    save_file(shards[0], out_dir / "model.safetensors", metadata=metadata)
    return ["model.safetensors"]
  names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  weight_map = {}
  for fname, shard in zip(names, shards):
    save_file(shard, out_dir / fname, metadata=metadata)
    weight_map.update({name: fname for name in shard})
  index = {"metadata": {"total_size": int(sum(t.nbytes for t in cast.values()))}, "weight_map": weight_map}
  io_utils.write_json(out_dir / "model.safetensors.index.json", index)
  return names + ["model.safetensors.index.json"]


def write_hf_config(out_dir: Path, cfg: ModelConfig, tok: Tokenizer, generation: dict[str, Any],
                    dtype: str) -> list[str]:
  """config.json and generation_config.json."""
  io_utils.write_json(out_dir / "config.json", hf_format.hf_config(cfg, tok.bos_id, tok.eos_id, tok.pad_id, dtype))
  stop_ids = list(dict.fromkeys([*tok.stop_ids, *generation.get("stop_ids", [])]))
  gen = {
      "bos_token_id": tok.bos_id,
      "eos_token_id": stop_ids,
      "pad_token_id": tok.pad_id,
      "do_sample": True,
      "temperature": generation["temperature"],
      "top_p": generation["top_p"],
      "top_k": generation["top_k"],  # 0 = off, as here (transformers' own default would be 50)
      "max_new_tokens": generation["max_new_tokens"],
  }
  io_utils.write_json(out_dir / "generation_config.json", gen)
  return ["config.json", "generation_config.json"]


def write_tokenizer(out_dir: Path, tok: Tokenizer, max_len: int) -> list[str]:
  """tokenizer.json, tokenizer_config.json (with the chat template), and our originals: tokenizer.model and
  our tokenizer_config.json as MIMIX_TOKENIZER_CONFIG (for import_hf)."""
  sp_model = Path(tok.model_path).read_bytes()
  names = _special_texts(tok)
  io_utils.write_json(out_dir / "tokenizer.json", hf_format.hf_tokenizer_json(sp_model, names["bos"]))
  config = {
      # The generic class loads tokenizer.json as written, in transformers 4.x and 5.x, with no custom code.
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": names["bos"],
      "eos_token": names["eos"],
      "pad_token": names["pad"],
      "model_max_length": max_len,
      "clean_up_tokenization_spaces": False,
      "chat_template": chat_template(names),
  }
  io_utils.write_json(out_dir / "tokenizer_config.json", config)
  (out_dir / "tokenizer.model").write_bytes(sp_model)
  shutil.copyfile(Path(tok.model_path).parent / tokenizer_lib.CONFIG_FILE, out_dir / hf_format.MIMIX_TOKENIZER_CONFIG)
  return ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", hf_format.MIMIX_TOKENIZER_CONFIG]


def chat_template(names: dict[str, str]) -> str:
  """Jinja for our dialog format (spec §3.4): bos, then per message
  <start_header>role<end_header>\\n\\n content <eot>, then the assistant header if add_generation_prompt.

  Content is stripped of surrounding whitespace (Jinja's trim is str.strip), as encode_dialog_prompt does.
  """
  sh, eh, eot = names["start_header"], names["end_header"], names["eot"]
  return (
      "{{- bos_token }}"
      "{%- for message in messages %}"
      f"{{{{- '{sh}' + message['role'] + '{eh}\\n\\n' + (message['content'] | trim) + '{eot}' }}}}"
      "{%- endfor %}"
      f"{{%- if add_generation_prompt %}}{{{{- '{sh}assistant{eh}\\n\\n' }}}}{{%- endif %}}"
  )


def write_mimixlm(out_dir: Path, params: dict, cfg: ModelConfig, tok: Tokenizer, generation: dict[str, Any],
                  dtype: str, name: str) -> list[str]:
  """The reference's model folder (spec §2.2-2.3): `model_weights` (torch.save of its state_dict names and
  [out, in] shapes, RoPE buffer included), `model_config.json`, and our sentencepiece `tokenizer.model`."""
  try:
    import torch
  except ImportError:
    raise RuntimeError("--format mimixlm writes a torch state dict and needs torch (pip install -e '.[torch]')")
  out_dir.mkdir()
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  tensors = hf_format.to_torch_state_dict(params, cfg, "mimixlm")
  torch.save({k: torch.tensor(v, dtype=torch_dtype) for k, v in tensors.items()}, out_dir / "model_weights")
  config = hf_format.mimixlm_config(cfg, tok.config, generation, dtype, model_name=name)
  (out_dir / "model_config.json").write_text(json.dumps(config, indent=4, ensure_ascii=False) + "\n")
  shutil.copyfile(tok.model_path, out_dir / "tokenizer.model")
  return ["mimixlm/model_weights", "mimixlm/model_config.json", "mimixlm/tokenizer.model"]


# ---------------------------------------------------------------------------------------------------------------
# Verification


def verify_export(export_dir: Path, model, tok: Tokenizer, dtype: str) -> dict[str, Any]:
  """Loads the export with transformers (weights upcast to float32) and compares logits with our float32 model
  on VERIFY_TEXTS and VERIFY_DIALOG; also checks that the exported tokenizer gives our ids. Prints one summary
  line per check; raises VerificationError above TOLERANCES[dtype]."""
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(export_dir)
  text_ids = [tok.encode(t, bos=True) for t in VERIFY_TEXTS]
  chat_ids = tok.encode_dialog_prompt(VERIFY_DIALOG)
  prompts = [ids[: model.cfg.max_len] for ids in (*text_ids, chat_ids)]

  # One batch, right-padded: causal attention keeps every real position's logits independent of the padding.
  batch = np.full((len(prompts), max(map(len, prompts))), tok.pad_id, np.int32)
  for row, ids in zip(batch, prompts):
    row[: len(ids)] = ids
  ours = np.asarray(model(jax.numpy.asarray(batch)))[..., : model.cfg.vocab_size].astype(np.float64)
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(batch).long()).logits.double().numpy()
  stats = [logit_stats(ours[i, : len(ids)], theirs[i, : len(ids)]) for i, ids in enumerate(prompts)]
  n = sum(s["positions"] for s in stats)
  result = {
      "transformers": transformers.__version__,
      "prompts": len(prompts),
      "positions": n,
      "max_abs_diff": max(s["max_abs_diff"] for s in stats),
      "mean_kl": sum(s["kl_sum"] for s in stats) / n,
      "top1_agreement": sum(s["top1_same"] for s in stats) / n,
  }
  hf_chat = hf_tok.apply_chat_template(VERIFY_DIALOG, add_generation_prompt=True, tokenize=True, return_dict=False)
  result["tokenizer_match"] = [hf_tok(t)["input_ids"] for t in VERIFY_TEXTS] == text_ids and list(hf_chat) == chat_ids
  tol = TOLERANCES[dtype]
  failed = [f"{k}={result[k]:.3g} {'<' if k == 'top1_agreement' else '>'} {bound}" for k, bound in tol.items()
            if (result[k] < bound if k == "top1_agreement" else result[k] > bound)]
  if not result["tokenizer_match"]:
    failed.append("tokenizer ids differ")
  result["tolerance"], result["passed"] = tol, not failed
  print(f"verify: transformers {result['transformers']} on {dtype} weights (upcast to float32) vs our float32 "
        f"model, {len(prompts)} prompts / {n} positions")
  print(f"  max |logit diff| {result['max_abs_diff']:.3g}   mean KL {result['mean_kl']:.3g}   "
        f"top-1 agreement {100 * result['top1_agreement']:.2f}%   tolerance {tol}")
  print(f"  tokenizer: AutoTokenizer ids (text and apply_chat_template) equal ours: {result['tokenizer_match']}")
  print(f"  {'PASS' if not failed else 'FAIL: ' + '; '.join(failed)}")
  if failed:
    raise VerificationError(f"export verification failed: {'; '.join(failed)}")
  return result


def logit_stats(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
  """[T, V] logits from both models -> max |diff|, summed KL(ours || theirs) and top-1 matches over T."""
  logp = ours - _logsumexp(ours)
  logq = theirs - _logsumexp(theirs)
  kl = np.sum(np.exp(logp) * (logp - logq), axis=-1)
  return {
      "positions": ours.shape[0],
      "max_abs_diff": float(np.max(np.abs(ours - theirs))),
      "kl_sum": float(np.sum(kl)),
      "top1_same": int(np.sum(ours.argmax(-1) == theirs.argmax(-1))),
  }


def _logsumexp(x: np.ndarray) -> np.ndarray:
  m = x.max(-1, keepdims=True)
  return m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def parse_size(size: str | int) -> int:
  """'5GB' (10^9), '500MiB' (2^20), '1e6' or 12345 -> bytes."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B)?\s*", size)
  if not m:
    raise ValueError(f"--max_shard_size {size!r}: expected a number of bytes or e.g. 500MB, 5GB, 2GiB")
  units = {None: 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30,
           "TiB": 2**40}
  return int(float(m.group(1)) * units[m.group(2)])


def _special_texts(tok: Tokenizer) -> dict[str, str]:
  """role (bos, eos, eot, start_header, end_header, pad) -> token text."""
  return {role: tok.special_tokens[role][0] for role in ("bos", "eos", "eot", "start_header", "end_header", "pad")}


def _torch_available() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    return False
  return True


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mimix_jax.export", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or RUN/checkpoints/STEP")
  p.add_argument("--output", required=True, help="the export directory to create")
  p.add_argument("--dtype", default="float32", choices=list(DTYPES))
  p.add_argument("--format", default="hf", choices=["hf", "mimixlm"],
                 help="mimixlm additionally writes the reference project's layout under OUTPUT/mimixlm")
  p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                 help="compare logits with transformers (default: on when torch is installed)")
  p.add_argument("--max_shard_size", default="5GB", help="safetensors shard limit, e.g. 500MB, 5GB")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
  args = p.parse_args(argv)
  try:
    report = export(args.checkpoint, args.output, args.dtype, args.format, args.verify, args.max_shard_size,
                    args.overwrite)
  except (VerificationError, hf_format.UnsupportedConfig, FileExistsError, FileNotFoundError, ValueError,
          RuntimeError) as e:
    print(f"export: error: {e}", file=sys.stderr)
    return 1
  verified = "verified" if report["verify"] else "NOT verified (--no-verify, or torch/transformers not installed)"
  print(f"exported {report['n_params']:,} params ({report['dtype']}, {verified}) from {report['checkpoint']} "
        f"to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
