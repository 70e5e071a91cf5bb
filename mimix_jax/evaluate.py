"""Evaluate a run: perplexity on raw text, or few-shot benchmark tasks scored as lm-evaluation-harness scores them.

    python -m mimix_jax.evaluate --checkpoint RUN_OR_STEP --data PATH... [--stride N]
    python -m mimix_jax.evaluate --checkpoint RUN_OR_STEP --tasks hellaswag,arc_easy,... [--task_dir DIR]
        [--num_fewshot K] [--limit N] [--seed S]

--data takes raw documents (.txt, .jsonl, .json, .csv, .parquet, gzipped too: files, directories or globs),
tokenized with the run's tokenizer; long documents are scored with a sliding window (evaluation/perplexity.py).
Prints a line per input file and, last, one JSON object with ppl, loss and tokens (also written to --output).

--tasks reads DIR/NAME.jsonl or .parquet (the split lm-eval evaluates, with the hub's columns) and, for few-shot
examples, DIR/NAME.train.jsonl or .parquet (evaluation/taskdata.py); without --task_dir the splits are loaded
from the hub with `datasets`. Prints a table on stderr and, last, one JSON line:
{"tasks": {NAME: {"acc", "acc_norm", "n"}}, "core": ...}; --output also gets the per-example records.
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
from mimix_jax.evaluation import perplexity, runner, taskdata
from mimix_jax.evaluation import tasks as tasks_lib
from mimix_jax.model import sharding, transformer
from mimix_jax.text.tokenizer import Tokenizer
from mimix_jax.training import checkpoints
from mimix_jax.training.run_dir import RunInfo


class UserError(Exception):
  pass


def open_run(checkpoint: str, mesh=None) -> tuple[RunInfo, dict, object]:
  """(the run's newest good checkpoint, its params sharded over `mesh` (default all devices, FSDP), the mesh);
  raises UserError for a missing, damaged or non-finite checkpoint."""
  try:
    info = checkpoints.open_checkpoint(checkpoint)
    mesh = mesh or sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    params = checkpoints.load_params(info, info.model, transformer.param_shardings(info.model, mesh))
    checkpoints.check_finite(params, info.step_dir)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  return info, params, mesh


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or RUN/checkpoints/STEP")
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--data", nargs="+", help="perplexity of raw text files, directories or globs")
  what.add_argument("--tasks", help=f"benchmark tasks, comma-separated, from {', '.join(tasks_lib.TASKS)}")
  p.add_argument("--output", default=None, help="also write the JSON result here")
  g = p.add_argument_group("perplexity")
  g.add_argument("--text_field", nargs="+", default=list(schemas.TEXT_FIELDS), help="JSON/CSV/parquet text fields")
  g.add_argument("--batch_size", type=int, default=8, help="windows per batch (rounded up to the device count)")
  g.add_argument("--max_len", type=int, default=None, help="window length (default: the model's max_len)")
  g.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: max_len // 2)")
  g = p.add_argument_group("tasks")
  g.add_argument("--task_dir", default=None, help="local task files (default: the hub, through `datasets`)")
  g.add_argument("--num_fewshot", type=int, default=0)
  g.add_argument("--limit", type=int, default=None, help="the first N examples of each task")
  g.add_argument("--seed", type=int, default=tasks_lib.DEFAULT_FEWSHOT_SEED,
                 help="few-shot sampling seed (lm-eval's default fewshot_random_seed)")
  g.add_argument("--batch_tokens", type=int, default=8192, help="rows x padded length per forward pass")
  args = p.parse_args(argv)
  try:
    result = run_tasks(args) if args.tasks else run_perplexity(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.output:
    io_utils.write_json(args.output, result, sort_keys=True)
  result.pop("samples", None)
  print(json.dumps(result))
  return 0


def run_tasks(args: argparse.Namespace) -> dict:
  from mimix_jax.evaluation.scorer import Scorer
  try:
    selected = tasks_lib.get(args.tasks)
  except ValueError as e:
    raise UserError(str(e)) from None
  info, params, mesh = open_run(args.checkpoint)
  tokenizer = Tokenizer.load(info.tokenizer_dir)
  scorer = Scorer(info.model, params, mesh, batch_tokens=args.batch_tokens)
  try:
    prepared = runner.prepare(tokenizer, [t.name for t in selected], scorer.max_len, args.task_dir,
                              args.num_fewshot, args.limit, args.seed)
  except (taskdata.TaskDataError, ValueError, FileNotFoundError) as e:
    raise UserError(str(e)) from None
  result = runner.run(scorer, prepared)
  print(runner.table(selected, result.summary), file=sys.stderr)
  return {**result.summary, "checkpoint": str(info.step_dir), "samples": result.records}


def run_perplexity(args: argparse.Namespace) -> dict:
  try:
    paths = readers.discover(args.data)
  except readers.InputError as e:
    raise UserError(str(e)) from None
  info, params, mesh = open_run(args.checkpoint)
  window = args.max_len or info.model.max_len
  stride = args.stride or max(window // 2, 1)
  if not 0 < stride <= window or window > info.model.max_len:
    raise UserError(f"need 0 < stride <= max_len <= {info.model.max_len}, got stride {stride}, max_len {window}")
  batch_size = -(-args.batch_size // mesh.size) * mesh.size
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
    raise UserError(f"no text to score in {' '.join(args.data)} (raw documents are read: .txt, or records with "
                    f"the fields {args.text_field}; a shard directory is not raw text)")
  loss = total_nll / total_tokens
  return {"checkpoint": str(info.step_dir), "ppl": math.exp(loss), "loss": loss, "tokens": total_tokens,
          "max_len": window, "stride": stride, "files": per_file}


if __name__ == "__main__":
  sys.exit(main())
