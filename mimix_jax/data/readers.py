"""Streaming readers for the raw input formats: .jsonl, .json, .csv, .parquet, .txt (each also gzipped).

Readers run in the main process and do only cheap work (splitting files into records); parsing and
validation happen later, in the workers, through `parse`. Nothing reads a whole file into memory except
`.json` (one JSON list, as the reference reads it). Every item carries a location for error messages:
`path:LINE` for line-based formats, `path#N` for the N-th record of a .json list or a parquet file.

A .txt file is one document, or several separated by lines consisting of exactly `<|endoftext|>` (the
reference splits on a regex that also cuts at every `<`, `>` and the bare word; we split on the whole line).
Documents larger than `TXT_PART_BYTES` are yielded in parts cut at paragraph boundaries, so a 10 GB book
never sits in memory and still tokenizes exactly as if it were whole (text/splitting.py).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import io
import json
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

from mimix_jax.text import splitting

# Skip reasons (the keys of the manifest's `skipped` mapping).
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_TEXT = "empty_text"
EMPTY_FILE = "empty_file"
UNREADABLE_FILE = "unreadable_file"

EXTENSIONS = (".jsonl", ".json", ".csv", ".txt", ".parquet")
TXT_PART_BYTES = 1 << 20
TXT_MAX_HOLD = 1 << 24
_TXT_SEP = re.compile(rb"^<\|endoftext\|>\r?\n", re.M)  # a separator line (complete: its newline was read)
_TXT_SEP_AT_EOF = re.compile(rb"^<\|endoftext\|>\r?(?:\n|\Z)", re.M)
_PARAGRAPH_CUT = re.compile(splitting.PARAGRAPH_BREAK.encode())  # parts end where the tokenizer cuts anyway
_SURROGATE = re.compile("[\ud800-\udfff]")
_NON_SPACE = re.compile(r"\S")
_DECODER = json.JSONDecoder()
BOM = "\ufeff".encode()


class InputError(ValueError):
  """A problem with the command-line inputs as a whole (no file matched, unsupported file type)."""


class RecordError(ValueError):
  """One bad record: `reason` is a short key for counting, `detail` is for the human."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass
class Item:
  """One raw record as read from disk.

  kind: "json" (payload: bytes of one JSON value), "obj" (an already decoded object), "text" (payload:
  bytes of a .txt document part; `first`/`last` say whether it starts/ends its document; `line` is its first
  line number) or "error" (payload: (reason, detail); the file could not be read from here on).
  """

  loc: str
  kind: str
  payload: Any
  first: bool = True
  last: bool = True
  line: int = 1


def file_format(path: str | os.PathLike) -> str | None:
  """'jsonl', 'json', 'csv', 'txt' or 'parquet' (a trailing .gz is allowed except for parquet), else None."""
  name = str(path).lower()
  if name.endswith(".gz"):
    name = name[:-3]
    if name.endswith(".parquet"):
      return None
  for ext in EXTENSIONS:
    if name.endswith(ext):
      return ext[1:]
  return None


def discover(patterns: Sequence[str]) -> list[Path]:
  """Files named by `patterns` (files, directories walked recursively, or globs), deduplicated.

  Each directory or glob expands in sorted order. Unsupported and hidden files (and hidden folders, such as a
  download's .cache/) inside directories are ignored; a file
  named explicitly with an unsupported extension, or a pattern matching nothing, is an InputError.
  """
  out: list[Path] = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      found = sorted(Path(root, f) for root, _, files in os.walk(pattern) for f in files
                     if not any(part.startswith(".") for part in Path(root, f).relative_to(pattern).parts))
      found = [p for p in found if file_format(p)]
      if not found:
        raise InputError(f"{pattern}: directory has no {'/'.join(EXTENSIONS)} files")
    elif os.path.exists(pattern):
      if not file_format(pattern):
        raise InputError(f"{pattern}: unsupported file type (expected one of {', '.join(EXTENSIONS)}, or .gz)")
      found = [Path(pattern)]
    else:
      matches = sorted(glob.glob(pattern, recursive=True))
      found = [Path(m) for m in matches if os.path.isfile(m) and file_format(m)]
      if not found:
        raise InputError(f"{pattern}: no such file, directory or matching supported file")
    out.extend(found)
  seen = set()
  return [p for p in out if not (p in seen or seen.add(p))]


def _open_binary(path: Path):
  return gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")


def iter_items(path: str | os.PathLike, columns: Sequence[str] | None = None) -> Iterator[Item]:
  """Yields the raw records of one file; read errors become a final "error" item, never an exception.

  columns: for parquet, the columns worth reading (None = all); ignored by the other formats.
  """
  path = Path(path)
  fmt = file_format(path)
  reader = {"jsonl": _jsonl, "json": _json, "csv": _csv, "txt": _txt, "parquet": _parquet}[fmt]
  count = 0
  try:
    for item in reader(path, columns) if fmt == "parquet" else reader(path):
      count += 1
      yield item
  except (OSError, EOFError, zlib.error, csv.Error, ValueError) as e:  # ValueError covers pyarrow.ArrowInvalid
    yield Item(str(path), "error", (UNREADABLE_FILE, f"{type(e).__name__}: {e}"))
    return
  if count == 0:
    yield Item(str(path), "error", (EMPTY_FILE, "no records"))


def _jsonl(path: Path) -> Iterator[Item]:
  with _open_binary(path) as f:
    for n, line in enumerate(f, 1):
      if n == 1:
        line = line.removeprefix(BOM)
      if line.strip():  # blank lines (e.g. a trailing one) are not records
        yield Item(f"{path}:{n}", "json", line, line=n)


def _json(path: Path) -> Iterator[Item]:
  """The records of one JSON value: each element of a top-level list (a single object is one record), parsed one
  at a time so that a malformed or too deeply nested element costs only itself."""
  with _open_binary(path) as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    yield Item(str(path), "error", (INVALID_UTF8, str(e)))
    return
  pos = _skip_space(text, 0)
  if pos == len(text):
    return
  if text[pos] != "[":
    yield _json_element(path, text, pos, 1)[0]
    return
  pos, n = _skip_space(text, pos + 1), 0
  while pos < len(text) and text[pos] != "]":
    n += 1
    item, end = _json_element(path, text, pos, n)
    yield item
    if end < 0:
      yield Item(f"{path}#{n}", "error", (MALFORMED_JSON, "the list cannot be read past this element"))
      return
    pos = _skip_space(text, end)
    if pos < len(text) and text[pos] == ",":
      pos = _skip_space(text, pos + 1)


def _json_element(path: Path, text: str, pos: int, n: int) -> tuple[Item, int]:
  """The n-th element, starting at text[pos], and the offset where it ends (-1 if that cannot be found)."""
  try:
    obj, end = _DECODER.raw_decode(text, pos)
    return Item(f"{path}#{n}", "obj", obj, line=n), end
  except json.JSONDecodeError as e:
    detail = e.msg
  except RecursionError:
    detail = "nested too deeply to parse"
  line = text.count("\n", 0, pos) + 1
  return Item(f"{path}#{n}", "error", (MALFORMED_JSON, f"{detail} (the element at line {line})"), line=n), \
      _value_end(text, pos)


def _skip_space(text: str, pos: int) -> int:
  m = _NON_SPACE.search(text, pos)
  return m.start() if m else len(text)


def _value_end(text: str, pos: int) -> int:
  """Where the JSON value starting at `pos` ends, from bracket depth outside strings (no recursion); -1 if never."""
  depth, in_string, escaped = 0, False, False
  for i in range(pos, len(text)):
    c = text[i]
    if in_string:
      if escaped:
        escaped = False
      elif c == "\\":
        escaped = True
      elif c == '"':
        in_string = False
    elif c == '"':
      in_string = True
    elif c in "[{":
      depth += 1
    elif c in "]}":
      depth -= 1
      if depth <= 0:
        return i + 1 if depth == 0 else i  # past this value, or at the enclosing list's end
    elif c == "," and depth == 0:
      return i
  return -1


def _csv(path: Path) -> Iterator[Item]:
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the default 128 KiB limit rejects long documents
  with _open_binary(path) as fb:
    # surrogateescape keeps reading past invalid bytes so that only the affected row is skipped (in `parse`).
    text = io.TextIOWrapper(fb, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.DictReader(text)
    start = reader.line_num + 2  # the header is line 1
    for row in reader:
      yield Item(f"{path}:{start}", "obj", row, line=start)
      start = reader.line_num + 1


def _parquet(path: Path, columns: Sequence[str] | None) -> Iterator[Item]:
  import pyarrow.parquet as pq  # imported lazily: only parquet inputs need it

  pf = pq.ParquetFile(path)
  names = set(pf.schema_arrow.names)
  cols = None if columns is None else [c for c in columns if c in names]  # [] still yields one {} per row
  n = 0
  for batch in pf.iter_batches(batch_size=1024, columns=cols):
    for row in batch.to_pylist():
      n += 1
      yield Item(f"{path}#{n}", "obj", row, line=n)


def _txt(path: Path) -> Iterator[Item]:
  """Documents (split at separator lines) in parts of about TXT_PART_BYTES, cut where a paragraph starts."""
  with _open_binary(path) as f:
    buf, eof, first, line, want = f.read(len(BOM)).removeprefix(BOM), False, True, 1, 2 * TXT_PART_BYTES
    while True:
      sep = (_TXT_SEP_AT_EOF if eof else _TXT_SEP).search(buf)
      if sep is None and not eof and len(buf) < want:
        block = f.read(TXT_PART_BYTES)
        eof = not block
        buf += block
        continue
      end = sep.start() if sep else len(buf)
      pos = 0
      while end - pos >= TXT_PART_BYTES:
        cut = _part_cut(buf, pos, end, may_force=sep is None and not eof)
        if cut is None:
          break
        yield Item(f"{path}:{line}", "text", buf[pos:cut], first=first, last=False, line=line)
        line += buf.count(b"\n", pos, cut)
        first, pos = False, cut
      if sep is None and not eof:
        buf = buf[pos:]
        want = 2 * TXT_PART_BYTES if pos else len(buf) + TXT_PART_BYTES  # no cut possible yet: read more first
        continue
      if pos < end or not first:
        yield Item(f"{path}:{line}", "text", buf[pos:end], first=first, last=True, line=line)
      if sep is None:
        return
      line += buf.count(b"\n", pos, sep.end())
      buf, first, want = buf[sep.end() :], True, 2 * TXT_PART_BYTES


def _part_cut(buf: bytes, pos: int, end: int, may_force: bool) -> int | None:
  """The first paragraph start at least TXT_PART_BYTES after `pos`, or None.

  A document with no paragraph break for TXT_MAX_HOLD bytes (may_force) is cut at its last line end instead,
  which bounds memory; only there can the parts tokenize differently from the whole document.
  """
  m = _PARAGRAPH_CUT.search(buf, pos + TXT_PART_BYTES - 3, end)
  while m and m.end() < pos + TXT_PART_BYTES:
    m = _PARAGRAPH_CUT.search(buf, m.start() + 1, end)
  if m:
    return m.end()
  if may_force and end - pos >= TXT_MAX_HOLD:
    nl = buf.rfind(b"\n", pos, end)
    return nl + 1 if nl >= pos else None
  return None


def parse(item: Item) -> Any:
  """The decoded record of a "json" or "obj" item; raises RecordError for invalid UTF-8 (also a lone surrogate
  escape such as "\\ud800", valid JSON that no tokenizer can encode), malformed or too deeply nested JSON."""
  if item.kind == "json":
    try:
      record = json.loads(item.payload.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise RecordError(INVALID_UTF8, str(e)) from None
    except json.JSONDecodeError as e:
      raise RecordError(MALFORMED_JSON, f"{e.msg} at column {e.colno}") from None
    except RecursionError:
      raise RecordError(MALFORMED_JSON, "nested too deeply to parse") from None
  elif item.kind == "obj":
    record = item.payload
  else:
    raise TypeError(f"parse() does not handle {item.kind!r} items")
  bad = _first_invalid_string(record)
  if bad is not None:  # csv rows are read with surrogateescape; JSON may spell lone surrogates
    raise RecordError(INVALID_UTF8, f"{bad} is not valid UTF-8 (a lone surrogate or an undecodable byte)")
  return record


def _first_invalid_string(record: Any) -> str | None:
  """The path ("field", "messages[2].content") of the first string holding a surrogate, walked without recursion."""
  todo = [("", record)]
  while todo:
    where, value = todo.pop()
    if isinstance(value, str):
      if _SURROGATE.search(value):
        return f"field {where or 'value'!r}"
    elif isinstance(value, dict):
      todo.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
      todo.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
  return None


def decode_text(item: Item) -> tuple[str, list[tuple[str, str, str]]]:
  """A "text" item's text, and (loc, reason, detail) for each line dropped because it is not valid UTF-8."""
  try:
    return item.payload.decode("utf-8"), []
  except UnicodeDecodeError:
    pass
  kept, bad = [], []
  path = item.loc.rsplit(":", 1)[0]
  for n, line in enumerate(item.payload.splitlines(keepends=True), item.line):
    try:
      kept.append(line.decode("utf-8"))
    except UnicodeDecodeError as e:
      bad.append((f"{path}:{n}", INVALID_UTF8, str(e)))
  return "".join(kept), bad
