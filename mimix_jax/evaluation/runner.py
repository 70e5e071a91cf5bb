"""The entry points: prepare() reads, prompts and tokenizes once; run() scores; evaluate_tasks() does both.

The training loop prepares once and runs every `eval_tasks_every` steps with its live params (a Scorer on its
own mesh); the evaluate command calls evaluate_tasks(). Requests of all tasks are scored together, so they
pack together and share one compile.

Result: Evaluation.summary = {"tasks": {NAME: {"acc", "acc_norm", "n"}}, "core": ..., "num_fewshot", "seed"}
(acc_norm None where lm-eval does not report it), and Evaluation.records = {NAME: [one dict per example:
doc_id, gold, pred, pred_norm, acc, acc_norm, loglikelihoods, greedy]}, in doc order.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from mimix_jax.evaluation import encoding, metrics, prompts, taskdata
from mimix_jax.evaluation import tasks as tasks_lib
from mimix_jax.evaluation.tasks import DEFAULT_FEWSHOT_SEED, Task


@dataclasses.dataclass
class Prepared:
  tasks: list[Task]
  examples: dict[str, list[prompts.Example]]
  rows: list[tuple[np.ndarray, int]]  # every request of every example, task by task, doc by doc
  num_fewshot: int
  seed: int


@dataclasses.dataclass
class Evaluation:
  summary: dict
  records: dict[str, list[dict]]


def load_examples(task: Task, task_dir: str | Path | None, num_fewshot: int, limit: int | None = None,
                  seed: int = DEFAULT_FEWSHOT_SEED) -> list[prompts.Example]:
  """One task's examples: its rows read and checked, its few-shot contexts drawn."""
  docs = taskdata.load_docs(task, task.eval_split, task_dir)
  shots = None
  if num_fewshot > 0:
    shots = docs if task.fewshot_split == task.eval_split else taskdata.load_docs(task, task.fewshot_split, task_dir)
  try:
    return prompts.examples(task, docs, shots, num_fewshot, seed, limit)
  except ValueError as e:
    raise taskdata.TaskDataError(str(e)) from None


def prepare(tokenizer, task_names: str | Sequence[str], max_len: int, task_dir: str | Path | None = None,
            num_fewshot: int = 0, limit: int | None = None, seed: int = DEFAULT_FEWSHOT_SEED) -> Prepared:
  """Everything before the model: rows, few-shot contexts, tokens. Raises TaskDataError / ValueError (user
  errors, one line each)."""
  if num_fewshot < 0 or (limit is not None and limit < 0):
    raise ValueError(f"--num_fewshot and --limit must be >= 0, got {num_fewshot} and {limit}")
  selected = tasks_lib.get(task_names)
  examples, rows = {}, []
  for task in selected:
    examples[task.name] = load_examples(task, task_dir, num_fewshot, limit, seed)
    requests = [r for ex in examples[task.name] for r in ex.requests]
    try:
      rows += encoding.encode_requests(tokenizer, requests, max_len)
    except ValueError as e:
      raise taskdata.TaskDataError(f"{task.name}: {e}") from None
  return Prepared(selected, examples, rows, num_fewshot, seed)


def run(scorer, prepared: Prepared, progress: bool = True) -> Evaluation:
  """Scores the prepared requests with `scorer` (scorer.Scorer) and computes every task's metrics."""
  with tqdm(total=len(prepared.rows), desc="tasks", unit="req", dynamic_ncols=True, file=sys.stderr,
            disable=not progress) as bar:
    lls, greedy = scorer.score(prepared.rows, bar)
  summaries, records, i = {}, {}, 0
  for task in prepared.tasks:
    records[task.name] = []
    for ex in prepared.examples[task.name]:
      n = len(ex.requests)
      records[task.name].append(metrics.score_example(task, ex, lls[i:i + n], greedy[i:i + n]))
      i += n
    summaries[task.name] = metrics.summarize(task, records[task.name])
  summary = {"tasks": summaries, "core": metrics.core(prepared.tasks, summaries),
             "num_fewshot": prepared.num_fewshot, "seed": prepared.seed}
  return Evaluation(summary, records)


def evaluate_tasks(scorer, tokenizer, task_names: str | Sequence[str], task_dir: str | Path | None = None,
                   num_fewshot: int = 0, limit: int | None = None, seed: int = DEFAULT_FEWSHOT_SEED,
                   progress: bool = True) -> Evaluation:
  """prepare() + run() with the scorer's max_len."""
  prepared = prepare(tokenizer, task_names, scorer.max_len, task_dir, num_fewshot, limit, seed)
  return run(scorer, prepared, progress)


def table(selected: Sequence[Task], summary: dict) -> str:
  """The summary as a text table: a row per task (n, acc, acc_norm, centered accuracy) and the CORE line."""
  fmt = lambda x: "-" if x is None else f"{x:.4f}"
  lines = [f"{'task':<16}{'n':>7}{'acc':>9}{'acc_norm':>10}{'centered':>10}"]
  for t in selected:
    s = summary["tasks"][t.name]
    lines.append(f"{t.name:<16}{s['n']:>7}{fmt(s['acc']):>9}{fmt(s['acc_norm']):>10}{metrics.centered(t, s):>10.4f}")
  lines.append(f"{'CORE':<16}{'':>7}{'':>9}{'':>10}{summary['core']:>10.4f}")
  return "\n".join(lines)
