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


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented UTF-8 JSON via a temporary file and a rename."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  os.replace(tmp, path)


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
  old = None
  if path.exists():
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
  os.replace(tmp, path)
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
