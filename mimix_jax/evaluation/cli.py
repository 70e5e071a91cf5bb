"""Benchmark tasks from the command line:

    python -m mimix_jax.evaluation.cli --checkpoint RUN --tasks hellaswag,arc_easy,... --task_dir DIR
        [--num_fewshot K] [--limit N] [--seed S] [--output FILE]

(the evaluate command's --tasks mode calls add_arguments() and run()). Task files: DIR/NAME.jsonl or .parquet,
the split lm-eval evaluates, and DIR/NAME.train.jsonl or .parquet for few-shot examples (see
mimix_jax/evaluation/taskdata.py); without --task_dir the splits are loaded from the hub with `datasets`.
Prints a table on stderr and, last, one JSON line: {"tasks": {NAME: {"acc", "acc_norm", "n"}}, "core": ...}.
--output writes that object with the per-example records under "samples".
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from mimix_jax.evaluation import metrics, runner, taskdata
from mimix_jax.evaluation import tasks as tasks_lib


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--tasks", required=True, help=f"comma-separated, from {', '.join(tasks_lib.TASKS)}")
  p.add_argument("--task_dir", default=None, help="local task files (default: the hub, through `datasets`)")
  p.add_argument("--num_fewshot", type=int, default=0)
  p.add_argument("--limit", type=int, default=None, help="the first N examples of each task")
  p.add_argument("--seed", type=int, default=tasks_lib.DEFAULT_FEWSHOT_SEED,
                 help="few-shot sampling seed (lm-eval's default fewshot_random_seed)")
  p.add_argument("--batch_tokens", type=int, default=8192, help="rows x padded length per forward pass")
  p.add_argument("--output", default=None, help="also write the result and the per-example records here")


def run(args: argparse.Namespace) -> int:
  from mimix_jax.evaluation.scorer import Scorer  # jax starts here, after the arguments are known to be good
  try:
    selected = tasks_lib.get(args.tasks)
    scorer, tokenizer = Scorer.from_checkpoint(args.checkpoint, batch_tokens=args.batch_tokens)
    prepared = runner.prepare(tokenizer, [t.name for t in selected], scorer.max_len, args.task_dir,
                              args.num_fewshot, args.limit, args.seed)
  except (taskdata.TaskDataError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  result = runner.run(scorer, prepared)
  print(table(selected, result.summary), file=sys.stderr)
  if args.output:
    with open(args.output, "w") as f:
      json.dump({**result.summary, "checkpoint": str(args.checkpoint), "samples": result.records}, f)
  print(json.dumps(result.summary))
  return 0


def table(selected, summary: dict) -> str:
  fmt = lambda x: "-" if x is None else f"{x:.4f}"
  lines = [f"{'task':<16}{'n':>7}{'acc':>9}{'acc_norm':>10}{'centered':>10}"]
  for t in selected:
    s = summary["tasks"][t.name]
    lines.append(f"{t.name:<16}{s['n']:>7}{fmt(s['acc']):>9}{fmt(s['acc_norm']):>10}{metrics.centered(t, s):>10.4f}")
  lines.append(f"{'CORE':<16}{'':>7}{'':>9}{'':>10}{summary['core']:>10.4f}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or RUN/checkpoints/STEP")
  add_arguments(p)
  return run(p.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
