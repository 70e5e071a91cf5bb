"""Per-example scores as lm-eval 0.4.13's ConfigurableTask.process_results computes them, and the aggregates.

Multiple choice: pred = argmax of the summed continuation log-likelihoods, pred_norm = argmax of each divided by
the length in characters (Python str length, i.e. code points) of its choice as doc_to_choice gives it (without
the leading delimiter); acc = [pred == gold], acc_norm = [pred_norm == gold]. np.argmax breaks ties toward the
first choice, as lm-eval's does. Loglikelihood (lambada): acc = the whole continuation is the greedy
(argmax) continuation. A task's acc / acc_norm is the mean over its examples.

CORE, as nanochat computes it over the DCLM tasks: the mean over tasks of (score - chance) / (1 - chance),
chance being nanochat's random baseline (Task.chance). nanochat picks each multiple-choice answer by the mean
per-token loss, a length-normalised choice; the nearest lm-eval metric is acc_norm, so the score centered is
acc_norm where the task reports it (hellaswag, arc_easy, arc_challenge, piqa, openbookqa) and acc elsewhere
(winogrande, boolq, lambada_openai) -- `core_score` is the one place that decides.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mimix_jax.evaluation.prompts import Example
from mimix_jax.evaluation.tasks import Task


def score_example(task: Task, ex: Example, lls: Sequence[float], greedy: Sequence[bool]) -> dict:
  """The example's record: predictions, per-example metrics and the raw log-likelihoods / greedy flags."""
  record = {"doc_id": ex.doc_id, "loglikelihoods": [float(x) for x in lls], "greedy": [bool(g) for g in greedy]}
  if task.output_type == "loglikelihood":
    return {**record, "acc": float(greedy[0])}
  lengths = np.array([float(len(c)) for c in ex.choices])
  pred = int(np.argmax(lls))
  pred_norm = int(np.argmax(np.asarray(lls, np.float64) / lengths))
  record.update(gold=ex.gold, pred=pred, pred_norm=pred_norm, acc=float(pred == ex.gold))
  if "acc_norm" in task.metrics:
    record["acc_norm"] = float(pred_norm == ex.gold)
  return record


def summarize(task: Task, records: Sequence[dict]) -> dict:
  """{"acc", "acc_norm" (None where lm-eval does not report it), "n"} over a task's records."""
  mean = lambda key: float(np.mean([r[key] for r in records])) if records else float("nan")
  return {"acc": mean("acc"), "acc_norm": mean("acc_norm") if "acc_norm" in task.metrics else None,
          "n": len(records)}


def core_score(task: Task, summary: dict) -> float:
  return summary["acc_norm"] if "acc_norm" in task.metrics else summary["acc"]


def centered(task: Task, summary: dict) -> float:
  return (core_score(task, summary) - task.chance) / (1.0 - task.chance)


def core(tasks: Sequence[Task], summaries: dict[str, dict]) -> float:
  """nanochat's CORE over these tasks: the mean centered score."""
  return float(np.mean([centered(t, summaries[t.name]) for t in tasks]))
