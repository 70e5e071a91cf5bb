"""Atomic file and directory writes, and content hashes.

A reader must never mistake an interrupted write for a finished one: everything is written under a temporary
name next to its destination and renamed into place only when complete (rename is atomic within a file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path next to `path` (same suffix, so writers that add one keep it); it replaces `path`
  when the block exits without an exception, and is removed otherwise."""
  path = Path(path)
  tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_file(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = False) -> None:
  """Writes `obj` as indented UTF-8 JSON via a temporary file and a rename."""
  write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
  """Yields an empty temporary directory that becomes `path` when the block exits without an exception.

  If the block raises, the temporary directory is removed and `path` is untouched. An existing non-empty
  `path` is an error unless `overwrite`, in which case it is replaced only after the new one is complete.
  """
  path = Path(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
    raise FileExistsError(f"{path} already exists and is not empty (pass --overwrite to replace it)")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  replace_dir(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
  """Moves the finished directory `src` to `dst`, replacing an existing `dst` only once `src` is in place."""
  old = None
  if dst.exists():
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
  os.replace(src, dst)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def sha256_files(paths: list[str | os.PathLike]) -> str:
  """One hex digest over the files' names and bytes, in the given order."""
  h = hashlib.sha256()
  for p in paths:
    p = Path(p)
    h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
    with open(p, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()
