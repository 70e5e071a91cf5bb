"""Atomic file and directory writes, and content hashes.

A reader must never mistake an interrupted write for a finished one: everything is written under a temporary
name next to its destination and renamed into place only when complete (rename is atomic within a file system).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
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
  Temporary directories that killed runs left next to `path` are removed first (those of live processes, or of
  other hosts, are left alone). The directory gets the permissions the umask gives (mkdtemp would make it 0700).
  """
  path = Path(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
    raise FileExistsError(f"{path} already exists and is not empty (pass --overwrite to replace it)")
  path.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_temporaries(path)
  tmp = Path(tempfile.mkdtemp(prefix=f"{_temporary_prefix(path)}{os.getpid()}-", dir=path.parent))
  tmp.chmod(0o777 & ~current_umask())
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  replace_dir(tmp, path)


def _temporary_prefix(path: Path, host: str | None = None) -> str:
  return f".{path.name}.tmp-{host or socket.gethostname()}-"


def remove_stale_temporaries(path: Path) -> list[Path]:
  """Removes `.NAME.tmp-HOST-PID-*` directories of processes of this host that no longer run; returns them."""
  prefix = _temporary_prefix(path)
  stale = []
  for candidate in path.parent.glob(f"{glob.escape(prefix)}*"):
    pid = candidate.name[len(prefix):].split("-", 1)[0]
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(candidate, ignore_errors=True)
      stale.append(candidate)
  return stale


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def honour_umask(path: str | os.PathLike) -> None:
  """Gives a file another library created privately the mode a plain open() would have."""
  os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def replace_dir(src: Path, dst: Path) -> None:
  """Moves the finished directory `src` to `dst`, replacing an existing `dst` only once `src` is in place."""
  old = None
  if dst.exists():
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
  os.replace(src, dst)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


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
