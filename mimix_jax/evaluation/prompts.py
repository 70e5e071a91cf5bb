"""Few-shot contexts and the (context, continuation) requests of each doc, as lm-eval 0.4.13 builds them.

For the plain-text prompts these tasks use (no chat template, no system instruction, description ""), lm-eval's
ConfigurableTask.fewshot_context + construct_requests come down to

    context  = shot_1 + ... + shot_K + text(doc)
    shot     = text(shot_doc) + " " + answer(shot_doc) + "\\n\\n"       (answer: the gold choice, or the target)
    requests = [(context, " " + choice) for choice in choices(doc)]      multiple choice
             = [(choice, " " + target(doc)) for choice in choices(doc)]  winogrande: the choices are the contexts
             = [(context, target(doc))]                                  lambada (its target starts with a space)

so lambada's few-shot examples carry two spaces before the answer word, as in lm-eval. A shot whose answer is
"" (a winogrande blank at the very end) is its text alone, with neither delimiter.

The shots come from one random.Random(seed) per task, consumed doc after doc in evaluation order (so --limit
N gives the first N docs the contexts a full run gives them), exactly as lm-eval's ContextSampler draws them.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from mimix_jax.evaluation.tasks import DEFAULT_FEWSHOT_SEED, FEWSHOT_DELIMITER, TARGET_DELIMITER, Task


class FewshotSampler:
  """lm_eval.api.samplers.ContextSampler: rnd.sample over the few-shot docs; with an eval doc to avoid, it draws
  n + 1 and drops the copies of that doc (and draws again from the pool without it if too few remain)."""

  def __init__(self, docs: Sequence[dict], seed: int = DEFAULT_FEWSHOT_SEED):
    self.docs = list(docs)
    self.rnd = random.Random(seed)

  def sample(self, n: int, eval_doc: dict | None = None) -> list[dict]:
    if n == 0:
      return []
    if not eval_doc:
      return self.rnd.sample(self.docs, n)
    shots = [d for d in self.rnd.sample(self.docs, n + 1) if d != eval_doc][:n]
    if len(shots) < n:
      shots = self.rnd.sample([d for d in self.docs if d != eval_doc], n)
    return shots


@dataclasses.dataclass
class Example:
  """One evaluated doc: its requests and what scoring needs."""
  task: str
  doc_id: int
  requests: list[tuple[str, str]]  # (context, continuation) per choice (one for lambada)
  choices: list[str] | None  # doc_to_choice, whose lengths acc_norm divides by; None for lambada
  gold: int | None  # the correct choice's index; None for lambada


def _shot(task: Task, doc: dict) -> str:
  """One few-shot example: lm-eval's build_qa_turn with an answer, rendered as text."""
  text, choices, target = task.text(doc), task.choices(doc) if task.choices else None, task.target(doc)
  if task.multiple_input:
    text, choices = choices[text], None
  if target is None or target == "":
    return text
  answer = choices[target] if choices and isinstance(target, int) else target
  return text + TARGET_DELIMITER + answer + FEWSHOT_DELIMITER


def example(task: Task, doc_id: int, doc: dict, shots: Sequence[dict]) -> Example:
  """The requests of `doc` after the few-shot examples `shots`."""
  prefix = "".join(_shot(task, s) for s in shots)
  if task.output_type == "loglikelihood":
    return Example(task.name, doc_id, [(prefix + task.text(doc), task.target(doc))], None, None)
  choices = task.choices(doc)
  if task.multiple_input:
    requests = [(prefix + c, TARGET_DELIMITER + task.target(doc)) for c in choices]
    gold = task.text(doc)
  else:
    context = prefix + task.text(doc)
    requests = [(context, TARGET_DELIMITER + c) for c in choices]
    gold = task.target(doc)
  return Example(task.name, doc_id, requests, choices, gold)


def examples(task: Task, docs: Sequence[dict], fewshot_docs: Sequence[dict] | None, num_fewshot: int,
             seed: int = DEFAULT_FEWSHOT_SEED, limit: int | None = None) -> list[Example]:
  """The first `limit` docs (all with None) as Examples with `num_fewshot` seeded shots each."""
  docs = docs[:limit] if limit else docs
  if num_fewshot == 0:
    return [example(task, i, doc, []) for i, doc in enumerate(docs)]
  need = num_fewshot + task.excludes_eval_doc
  if len(fewshot_docs or ()) < need:
    raise ValueError(f"{task.name}: --num_fewshot {num_fewshot} needs at least {need} rows in its "
                     f"{task.fewshot_split} split, which has {len(fewshot_docs or ())}")
  sampler = FewshotSampler(fewshot_docs, seed)
  return [example(task, i, doc, sampler.sample(num_fewshot, doc if task.excludes_eval_doc else None))
          for i, doc in enumerate(docs)]
