"""Raw text, conversations and preference pairs -> tokenized shards for the Grain loader.

  python -m mimix_jax.preprocess --stage {pretrain,sft,dpo} --tokenizer TOKENIZER_DIR --input PATH... \\
      --output SHARD_DIR --max_len N [--workers W] [--strict] [--pack] [--text_field F...] \\
      [--conversation_field F...] [--system_message TEXT] [--sample_ratio P --seed S]

The main process streams the inputs (readers.py) and cuts them into tasks; `--workers` processes parse,
validate and tokenize the tasks; the main process packs the results in input order (packing.py) and writes
shards (shards.py). Output depends only on the inputs and flags, never on the worker count. Everything is
written to a temporary directory renamed to SHARD_DIR at the end, so an interrupted run leaves no output.
Bad records are skipped and counted per reason (for .txt files, lines that are not valid UTF-8 are dropped
and counted, and the rest of the document is kept); the run fails (exit 1, one line on stderr, no output)
only when nothing valid remains, or at the first bad record with --strict.

manifest.json: stage, max_len, records_read / records_written (input records), skipped {reason: count} and
the first skipped_examples ("file:line: reason: detail"), truncated {how: count}, tokens (document tokens
written, bos/eos included, padding and the repeated first token of continuation rows excluded),
tokens_stored, examples (records the loader serves), shards, tokenizer_sha256 and the exact command.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import multiprocessing
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tqdm

from mimix_jax import io_utils
from mimix_jax.data import readers, schemas, shards
from mimix_jax.data.packing import DocumentPacker, SequencePacker, write_pair
from mimix_jax.data.readers import RecordError
from mimix_jax.tokenizer import Tokenizer

STAGES = ("pretrain", "sft", "dpo")
NO_TARGET = "no_target_within_max_len"
COMPLETION_TRUNCATED = "completion_truncated"
TASK_BYTES = 1 << 19  # raw bytes per task: large enough to amortize the hand-off, small enough to balance
TASK_ITEMS = 4096
MAX_EXAMPLES = 10  # bad records reported by location


class PreprocessError(Exception):
  """Ends the run with a one-line message and no output."""


@dataclasses.dataclass(frozen=True)
class Settings:
  stage: str
  tokenizer: str
  max_len: int
  text_fields: tuple[str, ...]
  conversation_fields: tuple[str, ...]
  system_message: str | None


@dataclasses.dataclass
class TaskResult:
  """What a worker returns for one task, in input order.

  pretrain: `tokens` is every document part back to back (bos/eos inserted), `lengths` per part, `first`/`last`
  whether the part starts/ends its document. sft: `sequences` of (tokens, loss_mask). dpo: `pairs`.
  """

  records: int = 0
  written: int = 0
  tokens_total: int = 0
  bad: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
  truncated: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  tokens: np.ndarray | None = None
  lengths: np.ndarray | None = None
  first: np.ndarray | None = None
  last: np.ndarray | None = None
  sequences: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
  pairs: list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = dataclasses.field(default_factory=list)


# ----- worker side -----

_worker: dict[str, Any] = {}


def init_worker(settings: Settings) -> None:
  _worker["settings"] = settings
  _worker["tok"] = Tokenizer.load(settings.tokenizer)


def process_task(items: list[readers.Item]) -> TaskResult:
  s: Settings = _worker["settings"]
  res = TaskResult(records=sum(item.first for item in items))
  good = []
  for item in items:
    if item.kind == "error":
      res.bad.append((item.loc, *item.payload))
    else:
      good.append(item)
  {"pretrain": _pretrain, "sft": _sft, "dpo": _dpo}[s.stage](good, s, _worker["tok"], res)
  return res


def _pretrain(items: list[readers.Item], s: Settings, tok: Tokenizer, res: TaskResult) -> None:
  texts, first, last = [], [], []
  for item in items:
    try:
      if item.kind == "text":
        text, bad_lines = readers.decode_text(item)
        res.bad.extend(bad_lines)
        if item.first and item.last and not text.strip():
          raise RecordError(readers.EMPTY_TEXT, "the document is empty")
      else:
        text = schemas.text_of(readers.parse(item), s.text_fields)
    except RecordError as e:
      res.bad.append((item.loc, e.reason, e.detail))
      continue
    texts.append(text)
    first.append(item.first)
    last.append(item.last)
  ids, lengths = tok.encode_many(texts)
  first, last = np.asarray(first, bool), np.asarray(last, bool)
  # bos before each document's first part, eos after its last; eos of one part precedes bos of the next.
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  where = np.concatenate([offsets[1:][last], offsets[:-1][first]])
  values = np.concatenate([np.full(last.sum(), tok.eos_id), np.full(first.sum(), tok.bos_id)]).astype(np.int32)
  order = np.argsort(where, kind="stable")
  res.tokens = np.insert(ids, where[order], values[order])
  res.lengths = lengths + first + last
  res.first, res.last = first, last
  res.written = int(last.sum())
  res.tokens_total = len(res.tokens)


def _sft(items: list[readers.Item], s: Settings, tok: Tokenizer, res: TaskResult) -> None:
  dialogs, locs = [], []
  for item in items:
    try:
      if item.kind == "text":
        raise RecordError(readers.WRONG_TYPE, ".txt files hold no conversations")
      dialogs.append(schemas.conversation_of(readers.parse(item), s.conversation_fields, s.system_message))
      locs.append(item.loc)
    except RecordError as e:
      res.bad.append((item.loc, e.reason, e.detail))
  row_len = s.max_len + 1
  for loc, (tokens, mask, ends) in zip(locs, tok.encode_dialogs(dialogs)):
    try:
      tokens, mask, how = truncate_conversation(tokens, mask, ends, row_len)
    except RecordError as e:
      res.bad.append((loc, e.reason, e.detail))
      continue
    if how:
      res.truncated[how] += 1
    res.sequences.append((tokens, mask))
    res.tokens_total += len(tokens)
  res.written = len(res.sequences)


def truncate_conversation(tokens: np.ndarray, mask: np.ndarray, ends: np.ndarray, row_len: int):
  """(tokens, mask, how) cut to at most row_len tokens; how is None, "at_turn" or "mid_turn".

  Prefers the end of the last assistant turn that fits; else cuts inside the first assistant turn if some of
  it fits; else raises RecordError (nothing left to train on).
  """
  if len(tokens) <= row_len:
    return tokens, mask, None
  fitting = [e for e in ends if e <= row_len and mask[e - 1]]  # ends of assistant turns (their eot is a target)
  if fitting:
    cut, how = int(fitting[-1]), "at_turn"
  elif mask[:row_len].any():
    cut, how = row_len, "mid_turn"
  else:
    raise RecordError(NO_TARGET, f"{len(tokens)} tokens and no assistant token within the first {row_len}")
  return tokens[:cut], mask[:cut], how


def _dpo(items: list[readers.Item], s: Settings, tok: Tokenizer, res: TaskResult) -> None:
  dialogs, loss_on, locs = [], [], []
  for item in items:
    try:
      if item.kind == "text":
        raise RecordError(readers.WRONG_TYPE, ".txt files hold no preference pairs")
      cp, cc, rp, rc = schemas.preference_of(readers.parse(item))
    except RecordError as e:
      res.bad.append((item.loc, e.reason, e.detail))
      continue
    dialogs += [cp + cc, rp + rc]
    loss_on += [[False] * len(cp) + [True] * len(cc), [False] * len(rp) + [True] * len(rc)]
    locs.append(item.loc)
  row_len = s.max_len + 1
  encoded = tok.encode_dialogs(dialogs, loss_on=loss_on)
  for k, loc in enumerate(locs):
    pair = [(t[:row_len], m[:row_len]) for t, m, _ in encoded[2 * k : 2 * k + 2]]
    if not all(m.any() for _, m in pair):
      res.bad.append((loc, COMPLETION_TRUNCATED, f"a completion starts after token {row_len} (max_len + 1)"))
      continue
    if any(len(t) > row_len for t, _, _ in encoded[2 * k : 2 * k + 2]):
      res.truncated["completion_cut"] += 1
    res.pairs.append((pair[0], pair[1]))
    res.tokens_total += len(pair[0][0]) + len(pair[1][0])
  res.written = len(res.pairs)


# ----- main process -----


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


def _ordered_map(settings: Settings, tasks: Iterable[list[readers.Item]], workers: int) -> Iterator[TaskResult]:
  """process_task over tasks, in order; with workers > 1 in a process pool, at most 2 tasks per worker in flight."""
  if workers <= 1:
    init_worker(settings)
    yield from map(process_task, tasks)
    return
  ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
  with ctx.Pool(workers, initializer=init_worker, initargs=(settings,)) as pool:
    pending: collections.deque = collections.deque()
    for task in tasks:
      pending.append(pool.apply_async(process_task, (task,)))
      if len(pending) >= 2 * workers:
        yield pending.popleft().get()
    while pending:
      yield pending.popleft().get()


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
  """Preprocesses per `args`; returns the manifest. Raises PreprocessError (nothing written) on failure."""
  if args.max_len < 1 or args.max_len >= 65535:
    raise PreprocessError(f"--max_len must be in [1, 65534], got {args.max_len}")
  if not 0.0 < args.sample_ratio <= 1.0:
    raise PreprocessError(f"--sample_ratio must be in (0, 1], got {args.sample_ratio}")
  try:
    tok = Tokenizer.load(args.tokenizer)
    paths = readers.discover(args.input)
  except (OSError, ValueError) as e:
    raise PreprocessError(str(e)) from None
  settings = Settings(args.stage, str(args.tokenizer), args.max_len, tuple(args.text_field),
                      tuple(args.conversation_field), args.system_message)
  columns = {"pretrain": settings.text_fields,
             "sft": settings.conversation_fields + ("system_prompt", "question", "response"),
             "dpo": ("prompt", "chosen", "rejected", "reject")}[args.stage]
  t0 = time.time()
  counts: collections.Counter = collections.Counter()
  skipped: collections.Counter = collections.Counter()
  truncated: collections.Counter = collections.Counter()
  examples: list[str] = []
  row_len = args.max_len + 1
  try:
    with io_utils.atomic_output_dir(args.output, overwrite=args.overwrite) as tmp:
      writer = shards.ShardWriter(tmp, args.stage, tok.vocab_size, args.shard_tokens)
      doc_packer = DocumentPacker(row_len, writer, tok.pad_id) if args.stage == "pretrain" else None
      seq_packer = SequencePacker(row_len, writer, args.pack) if args.stage == "sft" else None
      bar = tqdm.tqdm(desc=f"preprocess {args.stage}", unit=" records", disable=None, file=sys.stderr)
      tasks = make_tasks(paths, columns, args.sample_ratio, args.seed, counts)
      for res in _ordered_map(settings, tasks, args.workers):
        for loc, reason, detail in res.bad:
          if args.strict:
            raise PreprocessError(f"{loc}: {reason}: {detail} (--strict)")
          skipped[reason] += 1
          if len(examples) < MAX_EXAMPLES:
            examples.append(f"{loc}: {reason}: {detail}")
        truncated.update(res.truncated)
        counts.update(records_read=res.records, records_written=res.written, tokens=res.tokens_total)
        if doc_packer is not None and res.tokens is not None:
          bounds = np.concatenate([[0], np.cumsum(res.lengths)])
          for j in range(len(res.lengths)):
            doc_packer.add(res.tokens[bounds[j] : bounds[j + 1]], not res.first[j], bool(res.last[j]))
        for tokens, mask in res.sequences:
          seq_packer.add(tokens, mask)
        for chosen, rejected in res.pairs:
          write_pair(writer, chosen, rejected)
        bar.update(res.records)
        bar.set_postfix(tokens=f"{counts['tokens']:,}", refresh=False)
      bar.close()
      for packer in (doc_packer, seq_packer):
        if packer is not None:
          packer.finish()
      writer.flush()
      if counts["records_written"] == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in skipped.most_common()) or "no records"
        raise PreprocessError(f"no valid records in {' '.join(args.input)} ({reasons})" + (f"; first: {examples[0]}" if examples else ""))
      manifest = {
          "format": shards.FORMAT,
          "format_version": shards.FORMAT_VERSION,
          "stage": args.stage,
          "max_len": args.max_len,
          "packed": args.stage == "pretrain" or bool(args.pack),
          "records_read": counts["records_read"],
          "records_written": counts["records_written"],
          "skipped": dict(sorted(skipped.items())),
          "skipped_examples": examples,
          "sampled_out": counts["sampled_out"],
          "truncated": dict(sorted(truncated.items())),
          "tokens": counts["tokens"],
          "tokens_stored": sum(s["tokens_stored"] for s in writer.shards),
          "examples": sum(s["records"] for s in writer.shards),
          "shards": writer.shards,
          "token_dtype": writer.dtype.name,
          "tokenizer": str(args.tokenizer),
          "tokenizer_sha256": tok.sha256(),
          "vocab_size": tok.vocab_size,
          "pad_id": tok.pad_id,
          "bos_id": tok.bos_id,
          "eos_id": tok.eos_id,
          "eot_id": tok.eot_id,
          "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in paths],
          "text_fields": list(settings.text_fields),
          "conversation_fields": list(settings.conversation_fields),
          "system_message": settings.system_message,
          "sample_ratio": args.sample_ratio,
          "seed": args.seed,
          "command": shlex.join(["python", "-m", "mimix_jax.preprocess", *argv]),
      }
      io_utils.write_json(tmp / "manifest.json", manifest)
  except FileExistsError as e:
    raise PreprocessError(str(e)) from None
  manifest["seconds"] = time.time() - t0  # for the caller's summary only; not in the file (reruns stay identical)
  return manifest


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m mimix_jax.preprocess", description=__doc__.split("\n\n")[0])
  p.add_argument("--stage", choices=STAGES, required=True)
  p.add_argument("--tokenizer", required=True, help="tokenizer directory (python -m mimix_jax.tokenizer)")
  p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.txt .jsonl .json .csv .parquet, .gz)")
  p.add_argument("--output", required=True, help="shard directory to create")
  p.add_argument("--max_len", type=int, required=True, help="training sequence length; sequences store max_len + 1 tokens")
  p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
  p.add_argument("--strict", action="store_true", help="fail at the first bad record instead of skipping it")
  p.add_argument("--text_field", "--text_fields", nargs="+", default=list(schemas.TEXT_FIELDS), help="pretrain: record fields joined with a newline")
  p.add_argument("--conversation_field", "--conversation_fields", nargs="+", default=list(schemas.CONVERSATION_FIELDS),
                 help="sft: the first present field holds the messages")
  p.add_argument("--system_message", default=None, help="sft: system message for conversations without one")
  p.add_argument("--pack", action="store_true", help="sft: pack several conversations per sequence")
  p.add_argument("--sample_ratio", type=float, default=1.0, help="keep each record with this probability")
  p.add_argument("--seed", type=int, default=0, help="seeds --sample_ratio")
  p.add_argument("--shard_tokens", type=int, default=1 << 25, help="tokens per shard file (bounds memory)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  try:
    m = run(args, argv)
  except PreprocessError as e:
    print(f"preprocess: error: {e}", file=sys.stderr)
    return 1
  for line in m["skipped_examples"]:
    print(f"preprocess: skipped {line}", file=sys.stderr)
  skipped = sum(m["skipped"].values())
  print(f"preprocess: {args.stage}: read {m['records_read']:,} records, wrote {m['records_written']:,}, skipped {skipped:,}"
        f"{' ' + str(m['skipped']) if skipped else ''}; {m['tokens']:,} tokens in {m['examples']:,} examples of <= {args.max_len + 1} tokens"
        f" ({len(m['shards'])} shards) -> {args.output} in {m['seconds']:.2f}s ({m['tokens'] / max(m['seconds'], 1e-9):,.0f} tokens/s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
