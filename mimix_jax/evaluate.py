"""Perplexity: `python -m mimix_jax.evaluate --checkpoint RUN_OR_STEP --data PATH... [--stride N]`.

--data takes raw documents (.txt, .jsonl, .json, .csv, .parquet, gzipped too: files, directories or globs),
tokenized with the run's tokenizer as `<|begin_of_text|> text <|end_of_text|>`. Every token after bos is a
target, eos included, and no target crosses a document boundary. A document longer than the model's context is
scored with a sliding window: windows of max_len targets start every `stride` tokens and each window scores
only the targets no earlier window scored, so every target is predicted exactly once with at least
max_len - stride tokens of context, whatever the batch size or how the text was chunked into files.

Prints a line per input file and, last, one JSON object with ppl, loss and tokens (also written to --output).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from mimix_jax import checkpoint, losses, sharding
from mimix_jax.data import readers, schemas


def windows(doc: np.ndarray, window: int, stride: int) -> Iterator[tuple[np.ndarray, int]]:
  """(tokens [<= window + 1], n_scored) per window: the last n_scored targets of each window are new."""
  n_targets = len(doc) - 1
  scored = 0
  start = 0
  while scored < n_targets:
    end = min(start + window, n_targets)  # this window's targets are doc[start + 1 : end + 1]
    yield doc[start:end + 1], end - scored
    scored = end
    start += stride
    if end == n_targets:
      break
    start = min(start, scored)  # never leave a gap between windows (stride > window)


def batches(docs: Iterable[np.ndarray], window: int, stride: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Rows [batch_size, window] of windows, right-padded; the last batch padded with empty rows."""
  rows = []
  for doc in docs:
    for tokens, n_scored in windows(doc, window, stride):
      rows.append((tokens, n_scored))
      if len(rows) == batch_size:
        yield _pack(rows, window, batch_size)
        rows = []
  if rows:
    yield _pack(rows, window, batch_size)


def _pack(rows, window: int, batch_size: int) -> dict[str, np.ndarray]:
  out = {k: np.zeros((batch_size, window), np.int32) for k in ("inputs", "targets", "segment_ids")}
  out["loss_mask"] = np.zeros((batch_size, window), np.float32)
  out["positions"] = np.broadcast_to(np.arange(window, dtype=np.int32), (batch_size, window)).copy()
  for i, (tokens, n_scored) in enumerate(rows):
    n = len(tokens) - 1
    out["inputs"][i, :n] = tokens[:-1]
    out["targets"][i, :n] = tokens[1:]
    out["segment_ids"][i, :n] = 1
    out["loss_mask"][i, n - n_scored:n] = 1
  return out


def make_nll_fn(graphdef, mesh):
  """jit(params, batch) -> (sum of masked target NLL in float32, number of targets), replicated."""
  def fn(params, batch):
    model = nnx.merge(graphdef, params)
    total, count, _ = losses.lm_loss(model, batch)
    return total, count
  return jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def perplexity(nll_fn, params, mesh, docs: Iterable[np.ndarray], window: int, stride: int, batch_size: int,
               progress: tqdm | None = None) -> dict[str, float]:
  """Token-weighted NLL over docs; sums are accumulated in float64 on the host."""
  batch_sh = sharding.batch_sharding(mesh, 2)
  total, count = 0.0, 0
  for batch in batches(docs, window, stride, batch_size):
    device_batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    t, c = nll_fn(params, device_batch)
    total, count = total + float(t), count + int(c)
    if progress is not None:
      progress.update(int(c))
  loss = total / max(count, 1)
  return {"loss": loss, "ppl": math.exp(loss) if count else float("nan"), "tokens": count}


def documents(path: Path, tokenizer, text_fields: Sequence[str]) -> Iterator[np.ndarray]:
  """Token arrays [bos, ..., eos] of each document in one raw file (bad records are reported and skipped)."""
  parts: list[str] = []
  for item in readers.iter_items(path):
    try:
      if item.kind == "error":
        raise readers.RecordError(*item.payload)
      if item.kind == "text":
        text, _ = readers.decode_text(item)
        parts.append(text)
        if not item.last:
          continue
        text, parts = "".join(parts), []
      else:
        text = schemas.text_of(readers.parse(item), text_fields)
    except readers.RecordError as e:
      print(f"{item.loc}: skipped ({e})", file=sys.stderr)
      continue
    if text:
      yield np.asarray(tokenizer.encode(text, bos=True, eos=True), np.int32)


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

  from mimix_jax.tokenizer import Tokenizer
  try:
    info = checkpoint.read_run_info(args.checkpoint)
    paths = readers.discover(args.data)
  except (FileNotFoundError, readers.InputError) as e:
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
  graphdef, abstract = nnx.split(checkpoint.model_lib.abstract(info.model), nnx.Param)
  params = checkpoint.load_params(args.checkpoint, info.model, sharding.param_shardings(abstract, mesh))
  tokenizer = Tokenizer.load(info.tokenizer_dir)
  nll_fn = make_nll_fn(graphdef, mesh)

  per_file, total_nll, total_tokens = {}, 0.0, 0
  with sharding.activate(mesh), tqdm(desc="ppl", unit="tok", dynamic_ncols=True, file=sys.stderr) as bar:
    for path in paths:
      r = perplexity(nll_fn, params, mesh, documents(path, tokenizer, args.text_field), window, stride, batch_size, bar)
      per_file[str(path)] = r
      total_nll, total_tokens = total_nll + r["loss"] * r["tokens"], total_tokens + r["tokens"]
      bar.write(f"{path}: tokens {r['tokens']}  loss {r['loss']:.4f}  ppl {r['ppl']:.3f}")
  loss = total_nll / max(total_tokens, 1)
  result = {"checkpoint": str(info.step_dir), "ppl": math.exp(loss), "loss": loss, "tokens": total_tokens,
            "max_len": window, "stride": stride, "files": per_file}
  if args.output:
    checkpoint.write_json_atomic(args.output, result)
  print(json.dumps(result))
  return 0 if total_tokens else 1


if __name__ == "__main__":
  sys.exit(main())
