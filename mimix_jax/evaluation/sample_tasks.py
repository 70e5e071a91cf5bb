"""Small task files in each hub dataset's schema, made from the shipped public-domain text, for the demo, the
tests and the benchmarks (no network; the real data: README, `hf download`).

The rows are sentences of three shipped books cut into each task's form (the true ending among endings of
other sentences, a word blanked out, a yes/no label), so a model can do better than chance only by having
learnt English; the point is the schema and the scoring, not the difficulty. Deterministic for a seed. The
rows exercise what the scoring must get right: hellaswag's WikiHow bracket markup and empty ctx_b, ARC rows
with 3 or 5 choices and numeric labels, an openbookqa answerKey with a leading space, a winogrande blank at the
very end of a training sentence (a few-shot example with an empty answer), curly quotes (characters !=
bytes, for acc_norm), boolq passages long enough that few-shot contexts exceed a small model's max_len, and
lambada passages ending in "of the" (which even a tiny model continues greedily).

    python -m mimix_jax.evaluation.sample_tasks --output DIR [--n_eval 24] [--n_train 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
from pathlib import Path
from typing import Callable

DATA = Path(__file__).resolve().parents[2] / "data" / "corpus"
BOOKS = ("eval/misc_botchan.txt.gz", "train/jargon_file.txt.gz", "train/devils_dictionary.txt.gz")
ACTIVITIES = ("Reading a letter", "Travelling", "Teaching", "Programming", "Cooking", "Gardening", "Sailing")
PARQUET_TASKS = ("boolq",)  # written as parquet, the rest as jsonl: both readers are exercised


def sentences(seed: int) -> list[str]:
  """Plain sentences of 40-180 characters and 8+ words from BOOKS, shuffled by `seed`."""
  out = []
  for book in BOOKS:
    text = gzip.open(DATA / book, "rt", encoding="utf-8").read()
    for para in re.split(r"\n\s*\n", text):
      for s in re.split(r'(?<=[.!?])\s+(?=[A-Z"“])', re.sub(r"\s+", " ", para).strip()):
        # No markup our tasks give meaning to (blanks, brackets) and no box drawing.
        if 40 <= len(s) <= 180 and len(s.split()) >= 8 and not re.search(r"[_<>\[\]\u2500-\u257f\u2581]", s):
          out.append(s)
  random.Random(seed).shuffle(out)
  return out


class _Pool:
  """Draws sentences without repeats, so no two rows (and no eval and train rows) share one."""

  def __init__(self, sents: list[str]):
    self.sents, self.i = sents, 0

  def take(self, where: Callable[[str], bool] = lambda s: True) -> str:
    while not where(self.sents[self.i]):
      self.i += 1
    self.i += 1
    return self.sents[self.i - 1]


def _words(s: str) -> list[str]:
  return s.split()


def _last_word(s: str) -> str:
  return re.sub(r"\W+$", "", _words(s)[-1])


def _distinct_words(pool: _Pool, rnd: random.Random, n: int, avoid: set[str]) -> list[str]:
  out: list[str] = []
  while len(out) < n:
    w = re.sub(r"\W", "", rnd.choice(_words(pool.take())))
    if len(w) >= 3 and w.lower() not in avoid:
      avoid.add(w.lower())
      out.append(w)
  return out


def _hellaswag(pool: _Pool, rnd: random.Random, i: int, split: str) -> dict:
  w = _words(pool.take())
  a, b = len(w) // 3, len(w) // 3 + rnd.randint(2, 4)
  ctx_a, ctx_b = " ".join(w[:a]), "" if i % 7 == 3 else " ".join(w[a:b]).lower()
  true = " ".join(w[b:]) if ctx_b else " ".join(w[a:])
  endings = [true] + [" ".join(_words(pool.take())[-rnd.randint(4, 8):]) for _ in range(3)]
  rnd.shuffle(endings)
  label = endings.index(true)
  if i % 5 == 1:  # WikiHow rows carry bracketed markup that lm-eval's preprocess removes
    ctx_a = f"[header] How to keep going. {ctx_a}"
    endings = [e + " [title] Then rest. [step] Sleep." for e in endings]
  return {"ind": i, "activity_label": ACTIVITIES[i % len(ACTIVITIES)], "ctx_a": ctx_a, "ctx_b": ctx_b,
          "ctx": f"{ctx_a} {ctx_b}".strip(), "endings": endings, "source_id": f"mimix~{split}~{i}",
          "split": split, "split_type": "indomain", "label": str(label)}


def _arc(pool: _Pool, rnd: random.Random, i: int, split: str) -> dict:
  s = pool.take()
  answer = _last_word(s)
  n = 3 if i % 6 == 2 else 5 if i % 9 == 4 else 4
  texts = [answer] + _distinct_words(pool, rnd, n - 1, {answer.lower()})
  rnd.shuffle(texts)
  labels = list("12345"[:n] if i % 5 == 0 else "ABCDE"[:n])
  head = " ".join(_words(s)[:-1])
  return {"id": f"Mimix_{split}_{i}", "question": f"Which word ends this: {head} ...?",
          "choices": {"text": texts, "label": labels}, "answerKey": labels[texts.index(answer)]}


def _piqa(pool: _Pool, rnd: random.Random, i: int, split: str) -> dict:
  w, other = _words(pool.take()), _words(pool.take())
  cut = len(w) // 2
  sols = [" ".join(w[cut:]), " ".join(other[len(other) // 2:])]
  label = rnd.randint(0, 1)
  return {"goal": " ".join(w[:cut]), "sol1": sols[label], "sol2": sols[1 - label], "label": label}


def _winogrande(pool: _Pool, rnd: random.Random, i: int, split: str) -> dict:
  w = _words(pool.take())
  at_end = split == "train" and i == 1  # a blank at the very end: the shot's answer is ""
  k = len(w) - 1 if at_end else rnd.randrange(2, len(w) - 2)
  word = re.sub(r"\W", "", w[k]) or "it"
  sentence = " ".join(w[:k] + ["_"]) if at_end else " ".join(w[:k] + ["_"] + w[k + 1:])
  options = [word] + _distinct_words(pool, rnd, 1, {word.lower()})
  answer = rnd.randint(0, 1)
  if answer:
    options.reverse()
  return {"sentence": sentence, "option1": options[0], "option2": options[1], "answer": str(answer + 1)}


def _openbookqa(pool: _Pool, rnd: random.Random, i: int, split: str) -> dict:
  w = _words(pool.take())
  cut = len(w) // 2
  texts = [" ".join(w[cut:])] + [" ".join(_words(pool.take())[-(len(w) - cut):]) for _ in range(3)]
  true = texts[0]
  rnd.shuffle(texts)
  key = "ABCD"[texts.index(true)]
  return {"id": f"{split}-{i}", "question_stem": " ".join(w[:cut]),
          "choices": {"text": texts, "label": list("ABCD")}, "answerKey": f" {key}" if i == 3 else key}


def _boolq(pool: _Pool, rnd: random.Random, i: int, split: str) -> dict:
  passage = " ".join(pool.take() for _ in range(rnd.randint(2, 4)))
  label = rnd.randint(0, 1)
  claim = pool.take() if not label else rnd.choice(re.split(r"(?<=[.!?]) ", passage))
  question = "is it said that " + re.sub(r"[.!?\"”]+$", "", claim[0].lower() + claim[1:])
  return {"question": question, "passage": passage, "idx": i, "label": label}


def _lambada(pool: _Pool, rnd: random.Random, i: int, split: str) -> dict:
  if i % 2:
    s = pool.take(lambda s: " of the " in s)
    return {"text": pool.take() + " " + s[:s.index(" of the ") + len(" of the")]}
  return {"text": re.sub(r"\W+$", "", pool.take() + " " + pool.take())}


MAKERS = {"hellaswag": _hellaswag, "arc_easy": _arc, "arc_challenge": _arc, "piqa": _piqa,
          "winogrande": _winogrande, "openbookqa": _openbookqa, "boolq": _boolq, "lambada_openai": _lambada}


def write(output: str | Path, n_eval: int = 24, n_train: int = 10, seed: int = 0) -> dict[str, dict[str, Path]]:
  """Writes every task's evaluated split (and its train split, except lambada's) under `output`, named as
  taskdata.py reads them; returns {task: {split: path}}."""
  from mimix_jax.evaluation.taskdata import split_stem
  from mimix_jax.evaluation.tasks import TASKS
  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  pool = _Pool(sentences(seed))
  written: dict[str, dict[str, Path]] = {}
  for k, (name, make) in enumerate(MAKERS.items()):
    task, rnd = TASKS[name], random.Random(seed * 1000 + k)
    splits = {task.eval_split: n_eval}
    if task.fewshot_split != task.eval_split:
      splits[task.fewshot_split] = n_train
    for split, n in splits.items():
      rows = [make(pool, rnd, i, split) for i in range(n)]
      path = output / (split_stem(task, split) + (".parquet" if name in PARQUET_TASKS else ".jsonl"))
      _write_rows(path, rows)
      written.setdefault(name, {})[split] = path
  return written


def _write_rows(path: Path, rows: list[dict]) -> None:
  if path.suffix == ".parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
  else:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--output", required=True)
  p.add_argument("--n_eval", type=int, default=24, help="rows of each evaluated split")
  p.add_argument("--n_train", type=int, default=10, help="rows of each few-shot (train) split")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for name, splits in write(args.output, args.n_eval, args.n_train, args.seed).items():
    print(f"{name}: " + ", ".join(f"{split} {path}" for split, path in splits.items()), file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
