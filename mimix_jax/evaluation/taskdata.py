"""A task's rows: local files in the hub dataset's schema, or the hub itself through `datasets`.

With a task directory DIR, task NAME reads

    DIR/NAME.jsonl  or  DIR/NAME.parquet              the split lm-eval evaluates (Task.eval_split)
    DIR/NAME.train.jsonl  or  DIR/NAME.train.parquet  its few-shot split (Task.fewshot_split), needed only when
                                                      --num_fewshot > 0; lambada_openai has none: lm-eval draws
                                                      its examples from the evaluated split itself

with the hub's column names (extra columns are kept, as lm-eval keeps them). .jsonl files are UTF-8, one JSON
object per line (a byte-order mark is tolerated, blank lines are skipped, the row number is the line number);
.parquet rows are numbered from 1. Rows missing a column other rows have get None there, as `datasets` gives.
A bad row stops the run with one line: `FILE: row N: field 'answerKey' ...`.

Without a directory the split is loaded with `datasets.load_dataset(Task.dataset_path, Task.dataset_name)`
(network or a local `datasets` cache), the rows lm-eval itself would read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from mimix_jax.evaluation.tasks import RowError, Task

EXTENSIONS = (".jsonl", ".parquet")


class TaskDataError(ValueError):
  """A user error in task data: its message is one line naming the file (and row, and field)."""


def split_stem(task: Task, split: str) -> str:
  """The file name without extension: NAME for the evaluated split, NAME.SPLIT for any other."""
  return task.name if split == task.eval_split else f"{task.name}.{split}"


def split_file(task_dir: str | Path, task: Task, split: str) -> Path:
  """The one existing DIR/STEM.jsonl or DIR/STEM.parquet; a one-line error when there is none or both."""
  stem = split_stem(task, split)
  found = [p for p in (Path(task_dir) / (stem + ext) for ext in EXTENSIONS) if p.is_file()]
  if len(found) > 1:
    raise TaskDataError(f"{found[0]} and {found[1]} both exist: keep one")
  if not found:
    what = (f"the {split} split lm-eval evaluates" if split == task.eval_split else
            f"the {split} split {task.name} draws its few-shot examples from (or run with --num_fewshot 0)")
    raise TaskDataError(f"{Path(task_dir) / stem}.jsonl (or .parquet) not found: write {what} there, "
                        f"rows with {describe(task.schema)}")
  return found[0]


def describe(schema: dict[str, Any]) -> str:
  """{"question": str, "choices": {"text": [str], ...}} -> "question, choices{text,label}"."""
  return ", ".join(k + ("{" + ",".join(v) + "}" if isinstance(v, dict) else "") for k, v in schema.items())


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
  """(row number, row) of a .jsonl or .parquet file."""
  path = Path(path)
  return _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
  rows = []
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: row {n}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: row {n}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict):
        raise TaskDataError(f"{path}: row {n}: a JSON object is needed, got {type(row).__name__}")
      rows.append((n, row))
  return rows


def _parquet_rows(path: Path) -> list[tuple[int, dict]]:
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    with pq.ParquetFile(path) as parquet:  # read_table would import pyarrow.dataset and pandas (0.25 s)
      table = parquet.read()
  except (pa.ArrowException, OSError) as e:
    raise TaskDataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
  return list(enumerate(table.to_pylist(), 1))


def _check_type(value: Any, spec: Any, field: str) -> None:
  """Raises RowError unless value fits spec: a type, a tuple of types, [spec] (a list) or {key: spec}."""
  if isinstance(spec, dict):
    if not isinstance(value, dict):
      raise RowError(field, f"must be an object with {', '.join(spec)}, got {_type_name(value)}")
    for key, sub in spec.items():
      if key not in value:
        raise RowError(f"{field}.{key}", "is missing")
      _check_type(value[key], sub, f"{field}.{key}")
  elif isinstance(spec, list):
    if not isinstance(value, list):
      raise RowError(field, f"must be a list, got {_type_name(value)}")
    for i, item in enumerate(value):
      _check_type(item, spec[0], f"{field}[{i}]")
  else:
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) or not isinstance(value, types):  # bool is an int to Python, never to a label
      raise RowError(field, f"must be {' or '.join(t.__name__ for t in types)}, got {_type_name(value)}")


def _type_name(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def check_row(task: Task, row: dict) -> None:
  """RowError unless the row has the task's fields, of the hub's types, with consistent values."""
  for field, spec in task.schema.items():
    if field not in row:
      raise RowError(field, "is missing")
    _check_type(row[field], spec, field)
  task.check(row)


def docs_from_rows(task: Task, rows: Sequence[tuple[int, dict]], where: str) -> list[dict]:
  """lm-eval's docs (after process_docs) of checked rows; other rows' extra columns are None, as in `datasets`."""
  columns = dict.fromkeys(k for _, row in rows for k in row)
  docs = []
  for n, row in rows:
    try:
      check_row(task, row)
    except RowError as e:
      raise TaskDataError(f"{where}: row {n}: {e} ({task.name} rows need {describe(task.schema)})") from None
    docs.append(task.process({k: row.get(k) for k in columns}))
  if not docs:
    raise TaskDataError(f"{where}: no rows")
  return docs


def load_docs(task: Task, split: str, task_dir: str | Path | None) -> list[dict]:
  """The docs of one split, from DIR (see the module docstring) or, with task_dir None, from the hub."""
  if task_dir is not None:
    path = split_file(task_dir, task, split)
    return docs_from_rows(task, read_rows(path), str(path))
  return docs_from_rows(task, list(enumerate(_hub_rows(task, split), 1)), f"{task.dataset_path} ({split})")


def _hub_rows(task: Task, split: str) -> list[dict]:
  try:
    import datasets
  except ImportError:
    raise TaskDataError(f"{task.name}: without --task_dir the rows come from the Hugging Face hub through the "
                        "`datasets` package, which is not installed (pip install datasets), or pass --task_dir DIR"
                        ) from None
  try:
    return datasets.load_dataset(task.dataset_path, task.dataset_name, split=split).to_list()
  except Exception as e:  # network, cache and hub errors all mean the same thing to the user
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise TaskDataError(f"{task.name}: could not load {task.dataset_path} ({task.dataset_name or 'default'}, "
                        f"{split}) from the hub: {first}; pass --task_dir DIR with local files instead") from None
