"""The benchmark tasks, defined as lm-evaluation-harness 0.4.13 defines the tasks of the same names.

Each Task carries what lm-eval's YAML (and its `!function` helpers) say, written as Python:

- where the rows come from: the hub dataset (`dataset_path`, `dataset_name`), the split lm-eval evaluates (its
  test split if the YAML names one, else its validation split) and the split it draws few-shot examples from
  (its training split if any, else validation, else test: `Task.fewshot_docs`);
- the hub schema of a row (`schema`, checked by taskdata.py) and the semantic checks lm-eval would crash on or
  silently mis-score (a label outside the choices);
- `process`: the YAML's `process_docs` (only hellaswag has one), applied row by row as `datasets.map` does;
- `text`, `choices`, `target`: doc_to_text, doc_to_choice, doc_to_target. A `text` that returns an int
  (winogrande) is lm-eval's "multiple input" form: the choices are the contexts and the target is the shared
  continuation;
- `metrics`: the YAML's metric_list (acc_norm only where lm-eval reports it);
- `chance`: the random baseline nanochat's CORE centers each task on (the DCLM eval bundle's
  eval_meta_data.csv, "Random baseline", in percent there). boolq's is 62, the majority class, not 50.

Every task here uses lm-eval's defaults: description "", target_delimiter " ", fewshot_delimiter "\\n\\n", no
gen_prefix, no fewshot_config, the "default" sampler.

Templates are rendered by lm-eval with Jinja; for these templates (string fields, `join`, list literals) the
f-strings below give the same text. One lm-eval quirk is kept on purpose: a rendered text or target made only
of digits becomes an int (`_digits_to_int`, for the templates that can render to digits only), which is how
"{{label}}" becomes a choice index.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
DEFAULT_FEWSHOT_SEED = 1234  # lm-eval's fewshot_random_seed default (lm_eval.defaults.DEFAULT_OTHER_SEED)


class RowError(ValueError):
  """A row that does not fit the task: `field` names the offending field."""

  def __init__(self, field: str, problem: str):
    super().__init__(f"field {field!r} {problem}")
    self.field = field


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  dataset_path: str
  dataset_name: str | None
  eval_split: str
  fewshot_split: str
  output_type: str  # "multiple_choice" | "loglikelihood"
  schema: dict[str, Any]  # field -> str | int | (str, int) | [str] | {subfield: ...}
  text: Callable[[dict], str | int]
  target: Callable[[dict], int | str]
  choices: Callable[[dict], list[str]] | None = None
  process: Callable[[dict], dict] = lambda doc: doc
  check: Callable[[dict], None] = lambda doc: None
  metrics: tuple[str, ...] = ("acc",)
  chance: float = 0.0
  # lm-eval hands the evaluated doc to its sampler (which then draws n + 1 and drops the doc) only when the
  # task's few-shot split setting (unset for all of these tasks) equals its test split, i.e. when the task has
  # no test split. So hellaswag, piqa, winogrande and boolq exclude the doc; arc, openbookqa and lambada do not
  # (lambada draws from its own test split, so a doc can be its own example).
  excludes_eval_doc: bool = False

  @property
  def multiple_input(self) -> bool:
    return self.name == "winogrande"


def _digits_to_int(rendered: str) -> int | str:
  """lm-eval's doc_to_text / doc_to_target: a rendered template of digits only is a choice index."""
  return int(rendered) if rendered.isdigit() else rendered


def _in_range(field: str, value: Any, n: int) -> None:
  if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n):
    raise RowError(field, f"must index the {n} choices, got {value!r}")


# ----------------------------------------------------------------------------------------------------- hellaswag

_BRACKETED = re.compile("\\[.*?\\]")


def hellaswag_preprocess(text: str) -> str:
  """lm_eval/tasks/hellaswag/utils.py:preprocess (brackets are WikiHow artifacts)."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = _BRACKETED.sub("", text)
  text = text.replace("  ", " ")
  return text


def _hellaswag_process(doc: dict) -> dict:
  ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
  return {**doc, "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
          "choices": [hellaswag_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}


def _hellaswag_check(doc: dict) -> None:
  if not doc["endings"]:
    raise RowError("endings", "is empty")
  label = doc["label"]
  if isinstance(label, str):
    if not label.isdigit():
      raise RowError("label", f"must be a choice index (a string of digits, as on the hub), got {label!r}")
    label = int(label)
  _in_range("label", label, len(doc["endings"]))


# ----------------------------------------------------------------------------------------------- arc, openbookqa

_CHOICES = {"text": [str], "label": [str]}


def _labelled_choices_check(key: Callable[[str], str]) -> Callable[[dict], None]:
  def check(doc: dict) -> None:
    choices = doc["choices"]
    if len(choices["text"]) != len(choices["label"]) or not choices["text"]:
      raise RowError("choices", f"needs as many labels as texts (and at least one), got {len(choices['label'])} "
                     f"labels for {len(choices['text'])} texts")
    if key(doc["answerKey"]) not in choices["label"]:
      raise RowError("answerKey", f"{doc['answerKey']!r} is not one of choices.label {choices['label']}")
  return check


def _arc_task(name: str, dataset_name: str) -> Task:
  return Task(
      name=name, dataset_path="allenai/ai2_arc", dataset_name=dataset_name, eval_split="test", fewshot_split="train",
      output_type="multiple_choice", schema={"question": str, "choices": _CHOICES, "answerKey": str},
      text=lambda doc: f"Question: {doc['question']}\nAnswer:",
      choices=lambda doc: list(doc["choices"]["text"]),
      target=lambda doc: doc["choices"]["label"].index(doc["answerKey"]),
      check=_labelled_choices_check(lambda key: key), metrics=("acc", "acc_norm"), chance=0.25)


# --------------------------------------------------------------------------------------------------- winogrande

def _winogrande_target(doc: dict) -> str:
  idx = doc["sentence"].index("_") + 1
  return doc["sentence"][idx:].strip()


def _winogrande_choices(doc: dict) -> list[str]:
  idx = doc["sentence"].index("_")
  return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def _winogrande_check(doc: dict) -> None:
  if "_" not in doc["sentence"]:
    raise RowError("sentence", "has no '_' blank for the options")
  if doc["answer"] not in ("1", "2"):
    raise RowError("answer", f"must be the string '1' or '2' (as on the hub), got {doc['answer']!r}")


# ------------------------------------------------------------------------------------------------ piqa, boolq

def _binary_label_check(doc: dict) -> None:
  _in_range("label", doc["label"], 2)


def _lambada_check(doc: dict) -> None:
  if not doc["text"]:
    raise RowError("text", "is empty")


TASKS: dict[str, Task] = {t.name: t for t in [
    Task(name="hellaswag", dataset_path="Rowan/hellaswag", dataset_name=None, eval_split="validation",
         fewshot_split="train", output_type="multiple_choice",
         schema={"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": [str], "label": (str, int)},
         process=_hellaswag_process, text=lambda doc: _digits_to_int(doc["query"]),
         choices=lambda doc: doc["choices"], target=lambda doc: _digits_to_int(str(doc["label"])),
         check=_hellaswag_check, metrics=("acc", "acc_norm"), chance=0.25, excludes_eval_doc=True),
    _arc_task("arc_easy", "ARC-Easy"),
    _arc_task("arc_challenge", "ARC-Challenge"),
    Task(name="piqa", dataset_path="baber/piqa", dataset_name=None, eval_split="validation", fewshot_split="train",
         output_type="multiple_choice", schema={"goal": str, "sol1": str, "sol2": str, "label": int},
         text=lambda doc: f"Question: {doc['goal']}\nAnswer:",
         choices=lambda doc: [doc["sol1"], doc["sol2"]], target=lambda doc: doc["label"],
         check=_binary_label_check, metrics=("acc", "acc_norm"), chance=0.5, excludes_eval_doc=True),
    Task(name="winogrande", dataset_path="allenai/winogrande", dataset_name="winogrande_xl", eval_split="validation",
         fewshot_split="train", output_type="multiple_choice",
         schema={"sentence": str, "option1": str, "option2": str, "answer": str},
         text=lambda doc: {"1": 0, "2": 1}[doc["answer"]], choices=_winogrande_choices, target=_winogrande_target,
         check=_winogrande_check, chance=0.5, excludes_eval_doc=True),
    Task(name="openbookqa", dataset_path="allenai/openbookqa", dataset_name="main", eval_split="test",
         fewshot_split="train", output_type="multiple_choice",
         schema={"question_stem": str, "choices": _CHOICES, "answerKey": str},
         # doc_to_text names a column, so lm-eval returns it as it is (no template, no digit conversion).
         text=lambda doc: doc["question_stem"], choices=lambda doc: list(doc["choices"]["text"]),
         target=lambda doc: doc["choices"]["label"].index(doc["answerKey"].lstrip()),
         check=_labelled_choices_check(str.lstrip), metrics=("acc", "acc_norm"), chance=0.25),
    # lm-eval's boolq is SuperGLUE's (lm_eval/tasks/super_glue/boolq/default.yaml), not google/boolq.
    Task(name="boolq", dataset_path="aps/super_glue", dataset_name="boolq", eval_split="validation",
         fewshot_split="train", output_type="multiple_choice",
         schema={"question": str, "passage": str, "label": int},
         text=lambda doc: f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
         choices=lambda doc: ["no", "yes"], target=lambda doc: doc["label"],
         check=_binary_label_check, chance=0.62, excludes_eval_doc=True),
    Task(name="lambada_openai", dataset_path="EleutherAI/lambada_openai", dataset_name="default",
         eval_split="test", fewshot_split="test", output_type="loglikelihood", schema={"text": str},
         text=lambda doc: " ".join(doc["text"].split(" ")[:-1]), target=lambda doc: " " + doc["text"].split(" ")[-1],
         check=_lambada_check, chance=0.0),
]}


def get(names: str | list[str]) -> list[Task]:
  """Tasks by name ("a,b" or a list), in the order given; an unknown name is a one-line error."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in names if n not in TASKS]
  if unknown or not names:
    raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}" if unknown else
                     f"no task given; choose from {', '.join(TASKS)}")
  return [TASKS[n] for n in dict.fromkeys(names)]
