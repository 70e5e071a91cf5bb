"""Perplexity: `python -m mimix_jax.evaluate --checkpoint RUN_OR_STEP --data PATH... [--stride N]`.

--data takes raw documents (.txt, .jsonl, .json, .csv, .parquet, gzipped too: files, directories or globs),
tokenized with the run's tokenizer; long documents are scored with a sliding window (evaluation/perplexity.py).
Prints a line per input file and, last, one JSON object with ppl, loss and tokens (also written to --output).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

from tqdm import tqdm

from mimix_jax import io_utils
from mimix_jax.data import readers, schemas
from mimix_jax.evaluation import perplexity
from mimix_jax.model import sharding, transformer
from mimix_jax.text.tokenizer import Tokenizer
from mimix_jax.training import checkpoints


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or RUN/checkpoints/STEP")
  p.add_argument("--data", nargs="+", required=True, help="raw text files, directories or globs")
  p.add_argument("--text_field", nargs="+", default=list(schemas.TEXT_FIELDS), help="JSON/CSV/parquet text fields")
  p.add_argument("--batch_size", type=int, default=8, help="windows per batch (rounded up to the device count)")
  p.add_argument("--max_len", type=int, default=None, help="window length (default: the model's max_len)")
  p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: max_len // 2)")
  p.add_argument("--output", default=None, help="also write the JSON result here")
  args = p.parse_args(argv)

  try:
    info = checkpoints.open_checkpoint(args.checkpoint)
    paths = readers.discover(args.data)
  except (FileNotFoundError, ValueError) as e:  # readers.InputError and DamagedCheckpoint are ValueErrors
    print(f"error: {e}", file=sys.stderr)
    return 2
  window = args.max_len or info.model.max_len
  stride = args.stride or max(window // 2, 1)
  if not 0 < stride <= window or window > info.model.max_len:
    print(f"error: need 0 < stride <= max_len <= {info.model.max_len}, got stride {stride}, max_len {window}",
          file=sys.stderr)
    return 2
  mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
  batch_size = -(-args.batch_size // mesh.size) * mesh.size
  params = checkpoints.load_params(info, info.model, transformer.param_shardings(info.model, mesh))
  try:
    checkpoints.check_finite(params, info.step_dir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tokenizer = Tokenizer.load(info.tokenizer_dir)
  nll_fn = perplexity.make_nll_fn(info.model, mesh)

  per_file, total_nll, total_tokens = {}, 0.0, 0
  with sharding.activate(mesh), tqdm(desc="ppl", unit="tok", dynamic_ncols=True, file=sys.stderr) as bar:
    for path in paths:
      docs = perplexity.documents(path, tokenizer, args.text_field)
      r = perplexity.perplexity(nll_fn, params, mesh, docs, window, stride, batch_size, bar)
      per_file[str(path)] = r
      total_nll, total_tokens = total_nll + r["loss"] * r["tokens"], total_tokens + r["tokens"]
      bar.write(f"{path}: tokens {r['tokens']}  loss {r['loss']:.4f}  ppl {r['ppl']:.3f}")
  if not total_tokens:
    print(f"error: no text to score in {' '.join(args.data)} (raw documents are read: .txt, or records with the "
          f"fields {args.text_field}; a shard directory is not raw text)", file=sys.stderr)
    return 2
  loss = total_nll / total_tokens
  result = {"checkpoint": str(info.step_dir), "ppl": math.exp(loss), "loss": loss, "tokens": total_tokens,
            "max_len": window, "stride": stride, "files": per_file}
  if args.output:
    io_utils.write_json(args.output, result, sort_keys=True)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
