"""Raw text, conversations and preference pairs -> tokenized shards for the Grain loader.

The main process streams the inputs (readers.py) and cuts them into tasks; worker processes parse, validate
and tokenize the tasks; the main process packs the results in input order (packing.py) and writes shards
(shards.py). Output depends only on the inputs and options, never on the worker count. Everything is written
to a temporary directory renamed into place at the end, so an interrupted run leaves no output. Bad records
are skipped and counted per reason (for .txt files, lines that are not valid UTF-8 are dropped and counted,
and the rest of the document is kept); the run fails (PreprocessError, no output) only when nothing valid
remains, or at the first bad record with `strict`.

Each stage is a row of data/stages.py's `STAGES`: what it stores, the record columns it reads, how a worker
encodes a task, and how the main process packs the results.

manifest.json: stage, max_len, records_read / records_written (input records), skipped {reason: count} and
the first skipped_examples ("file:line: reason: detail"), truncated {how: count}, tokens (document tokens
written, bos/eos included, padding and the repeated first token of continuation rows excluded),
tokens_stored, examples (records the loader serves), shards, tokenizer_sha256 and the exact command.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import tqdm

from mimix_jax import io_utils
from mimix_jax.data import readers, schemas, shards
from mimix_jax.data.stages import STAGES, TaskResult
from mimix_jax.text.tokenizer import Tokenizer

ENCODE_ERROR = "encode_error"
TASK_BYTES = 1 << 19  # raw bytes per task: large enough to amortize the hand-off, small enough to balance
TASK_ITEMS = 4096
MAX_EXAMPLES = 10  # bad records reported by location


class PreprocessError(Exception):
  """Ends the run with a one-line message and no output."""


@dataclasses.dataclass(frozen=True)
class Options:
  """What a run does (the command's flags)."""

  stage: str
  tokenizer: str
  inputs: tuple[str, ...]
  output: str
  max_len: int
  workers: int = 1
  strict: bool = False
  text_fields: tuple[str, ...] = schemas.TEXT_FIELDS
  conversation_fields: tuple[str, ...] = schemas.CONVERSATION_FIELDS
  system_message: str | None = None
  pack: bool = False
  sample_ratio: float = 1.0
  seed: int = 0
  shard_tokens: int = 1 << 25
  overwrite: bool = False


_worker: dict[str, Any] = {}


def init_worker(options: Options) -> None:
  _worker["options"] = options
  _worker["tok"] = Tokenizer.load(options.tokenizer)


def process_task(items: list[readers.Item]) -> TaskResult:
  """One task's tokens; a record that fails in an unforeseen way is found by encoding the items one by one, and
  skipped as ENCODE_ERROR, so that it costs only itself."""
  try:
    return _encode(items)
  except Exception:  # noqa: BLE001 (anything a tokenizer or schema may raise on a record nobody foresaw)
    res = TaskResult()
    for item in items:
      try:
        res.extend(_encode([item]))
      except Exception as e:  # noqa: BLE001
        res.extend(TaskResult(records=int(item.first), bad=[(item.loc, ENCODE_ERROR, f"{type(e).__name__}: {e}")]))
    return res


def _encode(items: list[readers.Item]) -> TaskResult:
  o: Options = _worker["options"]
  res = TaskResult(records=sum(item.first for item in items))
  STAGES[o.stage].encode(items, o, _worker["tok"], res)
  return res


def make_tasks(paths: Sequence[Path], columns: Sequence[str] | None, sample_ratio: float, seed: int, counts: collections.Counter) -> Iterator[list[readers.Item]]:
  """Groups the input items into tasks; drops records not sampled (`sample_ratio` < 1, seeded)."""
  rng = random.Random(seed)
  task, size = [], 0
  keep = True
  for path in paths:
    for item in readers.iter_items(path, columns):
      if item.kind != "error" and sample_ratio < 1.0:
        if item.first:  # one decision per record; later parts of a .txt document follow their first part
          keep = rng.random() < sample_ratio
          counts["sampled_out"] += not keep
        if not keep:
          continue
      task.append(item)
      size += _payload_size(item.payload)
      if size >= TASK_BYTES or len(task) >= TASK_ITEMS:
        yield task
        task, size = [], 0
  if task:
    yield task


def _payload_size(payload: Any) -> int:
  """Rough bytes of a raw record, so tasks of huge parquet rows stay small."""
  if isinstance(payload, bytes):
    return len(payload)
  if isinstance(payload, dict):
    return 64 + sum(len(v) for v in payload.values() if isinstance(v, str))
  return 256


def _ordered_map(options: Options, tasks: Iterable[list[readers.Item]]) -> Iterator[TaskResult]:
  """process_task over tasks, in order; with workers > 1 in a process pool, at most 2 tasks per worker in flight.

  A worker that dies (the OOM killer's usual victim) breaks the pool: the run fails at once, naming the records
  that were in flight, instead of waiting for a result that never comes.
  """
  if options.workers <= 1:
    init_worker(options)
    yield from map(process_task, tasks)
    return
  ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
  with concurrent.futures.ProcessPoolExecutor(options.workers, mp_context=ctx, initializer=init_worker,
                                              initargs=(options,)) as pool:
    pending: collections.deque = collections.deque()
    try:
      for task in tasks:
        pending.append((task, pool.submit(process_task, task)))
        if len(pending) >= 2 * options.workers:
          yield pending[0][1].result()
          pending.popleft()
      while pending:
        yield pending[0][1].result()
        pending.popleft()
    except concurrent.futures.process.BrokenProcessPool:
      spans = sorted({f"{task[0].loc} .. {task[-1].loc}" for task, _ in pending})
      raise PreprocessError(f"a worker process died (killed, or out of memory?) while tokenizing {'; '.join(spans)}; "
                            "nothing was written: re-run, with fewer --workers if memory is short") from None


@dataclasses.dataclass
class _Tally:
  """What the main process counts while it packs."""

  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  truncated: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: list[str] = dataclasses.field(default_factory=list)

  def add(self, res: TaskResult, strict: bool) -> None:
    for loc, reason, detail in res.bad:
      if strict:
        raise PreprocessError(f"{loc}: {reason}: {detail} (--strict)")
      self.skipped[reason] += 1
      if len(self.examples) < MAX_EXAMPLES:
        self.examples.append(f"{loc}: {reason}: {detail}")
    self.truncated.update(res.truncated)
    self.counts.update(records_read=res.records, records_written=res.written, tokens=res.tokens_total)


def run(o: Options, command: str) -> dict:
  """Preprocesses per `o`; returns the manifest. Raises PreprocessError (nothing written) on failure."""
  if o.stage not in STAGES:
    raise PreprocessError(f"--stage {o.stage!r}: choose from {', '.join(STAGES)}")
  if o.max_len < 1 or o.max_len >= 65535:
    raise PreprocessError(f"--max_len must be in [1, 65534], got {o.max_len}")
  if not 0.0 < o.sample_ratio <= 1.0:
    raise PreprocessError(f"--sample_ratio must be in (0, 1], got {o.sample_ratio}")
  try:
    tok = Tokenizer.load(o.tokenizer)
    paths = readers.discover(o.inputs)
  except (OSError, ValueError) as e:
    raise PreprocessError(str(e)) from None
  stage = STAGES[o.stage]
  t0 = time.time()
  tally = _Tally()
  try:
    with io_utils.atomic_output_dir(o.output, overwrite=o.overwrite) as tmp:
      writer = shards.ShardWriter(tmp, stage.layout, tok.vocab_size, o.shard_tokens)
      packer = stage.packer(writer, o, tok)
      bar = tqdm.tqdm(desc=f"preprocess {o.stage}", unit=" records", disable=None, file=sys.stderr)
      tasks = make_tasks(paths, stage.columns(o), o.sample_ratio, o.seed, tally.counts)
      for res in _ordered_map(o, tasks):
        tally.add(res, o.strict)
        packer.add_result(res)
        bar.update(res.records)
        bar.set_postfix(tokens=f"{tally.counts['tokens']:,}", refresh=False)
      bar.close()
      packer.finish()
      writer.flush()
      if tally.counts["records_written"] == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in tally.skipped.most_common()) or "no records"
        first = f"; first: {tally.examples[0]}" if tally.examples else ""
        raise PreprocessError(f"no valid records in {' '.join(o.inputs)} ({reasons}){first}")
      manifest = _manifest(o, tok, paths, writer, tally, command)
      io_utils.write_json(tmp / "manifest.json", manifest)
  except FileExistsError as e:
    raise PreprocessError(str(e)) from None
  manifest["seconds"] = time.time() - t0  # for the caller's summary only; not in the file (reruns stay identical)
  return manifest


def _manifest(o: Options, tok: Tokenizer, paths: list[Path], writer: shards.ShardWriter, tally: _Tally,
              command: str) -> dict:
  return {
      "format": shards.FORMAT,
      "format_version": shards.FORMAT_VERSION,
      "stage": o.stage,
      "max_len": o.max_len,
      "packed": STAGES[o.stage].packs(o),
      "records_read": tally.counts["records_read"],
      "records_written": tally.counts["records_written"],
      "skipped": dict(sorted(tally.skipped.items())),
      "skipped_examples": tally.examples,
      "sampled_out": tally.counts["sampled_out"],
      "truncated": dict(sorted(tally.truncated.items())),
      "tokens": tally.counts["tokens"],
      "tokens_stored": sum(s["tokens_stored"] for s in writer.shards),
      "examples": sum(s["records"] for s in writer.shards),
      "shards": writer.shards,
      "token_dtype": writer.dtype.name,
      "tokenizer": str(o.tokenizer),
      "tokenizer_sha256": tok.sha256(),
      "vocab_size": tok.vocab_size,
      "pad_id": tok.pad_id,
      "bos_id": tok.bos_id,
      "eos_id": tok.eos_id,
      "eot_id": tok.eot_id,
      "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in paths],
      "text_fields": list(o.text_fields),
      "conversation_fields": list(o.conversation_fields),
      "system_message": o.system_message,
      "sample_ratio": o.sample_ratio,
      "seed": o.seed,
      "command": command,
  }
