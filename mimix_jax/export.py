"""Export a checkpoint to a Hugging Face Llama directory (optionally also the MimixLM layout), verified by logits.

    python -m mimix_jax.export --checkpoint RUN_OR_STEP --output DIR [--dtype float32|bfloat16]
        [--format hf|mimixlm] [--verify/--no-verify] [--max_shard_size 5GB] [--overwrite]

OUTPUT/
  config.json                 LlamaForCausalLM (lm_head.weight when untied, the rope fields); names for 4.x and 5.x
  generation_config.json      stops on eos and eot; the run's sampling defaults
  model.safetensors           or model-0000k-of-0000n.safetensors + model.safetensors.index.json above the limit
  tokenizer.json              the sentencepiece BPE as a `tokenizers` BPE (same ids), specials as added tokens
  tokenizer_config.json       special tokens and the chat template (our training template, in Jinja)
  tokenizer.model             the original sentencepiece model
  mimix_tokenizer_config.json our tokenizer's config (import_hf restores the tokenizer from these two)
                              (a run imported with a tokenizer.json gets the model's own tokenizer files back;
                              a run with the original's rank file gets it as a byte-level tokenizer.json)
  export.json                 what was exported from where, and the verification numbers
  mimixlm/                    with --format mimixlm: model_weights (the original's torch state dict),
                              model_config.json, tokenizer.model: the original's BPE rank file when the run's
                              tokenizer is a byte-level BPE, else our sentencepiece model, which the original's
                              tokenizer loader cannot read (export prints a note saying so)

Only the params are restored (no optimizer state), onto the default device, from a checkpoint saved on any mesh
(the newest undamaged one of a run); weights holding NaN or inf are refused; padded vocabulary rows are stripped.
Exit codes: 0 exported (and verified), 1 verification failed, 2 a user error. Everything is written into a temporary directory that is renamed to OUTPUT
only after verification passed, so OUTPUT is never a half-written or unverified export.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mimix_jax import io_utils
from mimix_jax.hf import configs, files, layout, verify as verify_lib
from mimix_jax.model import transformer
from mimix_jax.text.tokenizer import Tokenizer
from mimix_jax.training import checkpoints


def export(checkpoint: str | os.PathLike, output: str | os.PathLike, dtype: str = "float32", fmt: str = "hf",
           verify: bool | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False) -> dict[str, Any]:
  """Writes the export (see the module docstring) and returns the report that export.json holds.

  verify=None verifies when torch and transformers are importable. Raises VerificationError (OUTPUT untouched)
  when verification fails.
  """
  if dtype not in files.DTYPES:
    raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(files.DTYPES)}")
  if fmt not in ("hf", "mimixlm"):
    raise ValueError(f"--format {fmt!r}: choose from hf, mimixlm")
  if verify is None:
    verify = verify_lib.transformers_available()
  elif verify and not verify_lib.transformers_available():
    raise RuntimeError("--verify needs torch and transformers (pip install -e '.[torch]'); or pass --no-verify")
  info = checkpoints.open_checkpoint(checkpoint)  # a run's newest undamaged step
  # float32 compute and plain XLA attention: the reference numbers for verification, and any backend runs them.
  cfg = dataclasses.replace(info.model, dtype="float32", attention="xla", remat="none")
  tok = Tokenizer.load(info.tokenizer_dir)
  params = jax.tree.map(np.asarray, checkpoints.load_params(info, cfg))
  checkpoints.check_finite(params, info.step_dir)
  with io_utils.atomic_output_dir(output, overwrite=overwrite) as tmp:
    state_dict = layout.to_torch_state_dict(params, cfg, "hf")
    n_params = int(sum(v.size for v in state_dict.values()))
    written = files.write_safetensors(tmp, state_dict, dtype, max_shard_size)
    del state_dict  # a full copy of the weights: free it before verification loads two more
    written += files.write_hf_config(tmp, cfg, tok, info.generation, dtype)
    written += files.TOKENIZER_WRITERS[tok.backend.name](tmp, tok, cfg.max_len)
    note = None
    if fmt == "mimixlm":
      mimixlm_files, note = files.write_mimixlm(tmp / "mimixlm", params, cfg, tok, info.generation, dtype,
                                                name=info.run_dir.name)
      written += mimixlm_files
    report = {
        "checkpoint": str(info.step_dir),
        "output": str(output),
        "format": fmt,
        "dtype": dtype,
        "n_params": n_params,
        "files": sorted(written),
        "sha256": {name: io_utils.sha256_file(tmp / name) for name in sorted(written)},  # import_hf checks them
        "generation": info.generation,  # import_hf restores it
        "mimixlm_tokenizer_note": note,
        "verify": verify_export(tmp, cfg, params, tok, dtype) if verify else None,
    }
    io_utils.write_json(tmp / "export.json", report)
  return report


def verify_export(export_dir: Path, cfg, params: dict, tok: Tokenizer, dtype: str) -> dict[str, Any]:
  """Our float32 logits on the verification prompts, compared with transformers' on the export."""
  text_ids = [tok.encode(t, bos=True) for t in verify_lib.VERIFY_TEXTS]
  # A model's own template lets transformers read special-token strings in content as control tokens (ours never
  # does), so its dialog is checked without them.
  dialog = verify_lib.PLAIN_DIALOG if tok.template.name == "jinja" else verify_lib.VERIFY_DIALOG
  chat_ids = tok.encode_dialog_prompt(dialog)
  prompts = [ids[: cfg.max_len] for ids in (*text_ids, chat_ids)]
  batch = verify_lib.prompt_batch(prompts, tok.pad_id)
  model = transformer.from_params(cfg, params)
  ours = np.asarray(model(jax.numpy.asarray(batch)))[..., : cfg.vocab_size].astype(np.float64)
  return verify_lib.verify(export_dir, batch, [len(p) for p in prompts], ours, text_ids, chat_ids, dtype, dialog)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mimix_jax.export", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or RUN/checkpoints/STEP")
  p.add_argument("--output", required=True, help="the export directory to create")
  p.add_argument("--dtype", default="float32", choices=list(files.DTYPES))
  p.add_argument("--format", default="hf", choices=["hf", "mimixlm"],
                 help="mimixlm additionally writes the original project's layout under OUTPUT/mimixlm")
  p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                 help="compare logits with transformers (default: on when torch is installed)")
  p.add_argument("--max_shard_size", default="5GB", help="safetensors shard limit, e.g. 500MB, 5GB")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
  args = p.parse_args(argv)
  try:
    report = export(args.checkpoint, args.output, args.dtype, args.format, args.verify, args.max_shard_size,
                    args.overwrite)
  except verify_lib.VerificationError as e:  # the export would be wrong: nothing was written
    print(f"export: error: {e}", file=sys.stderr)
    return 1
  except (configs.UnsupportedConfig, FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"export: error: {e}", file=sys.stderr)
    return 2
  verified = "verified" if report["verify"] else "NOT verified (--no-verify, or torch/transformers not installed)"
  if report["mimixlm_tokenizer_note"]:
    print(f"export: note: {report['mimixlm_tokenizer_note']}")
  print(f"exported {report['n_params']:,} params ({report['dtype']}, {verified}) from {report['checkpoint']} "
        f"to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
