"""Fetching a recipe's raw datasets: each source's training files, from the Hugging Face hub (huggingface_hub's
snapshot_download, what `hf download` runs: it resumes partial files) or from a local mirror laid out as the hub
lays datasets out (MIRROR/datasets/ORG/NAME/...: the rehearsal's), selected by the same patterns with the same
filter. A source counts as done only once every file is in place and its marker is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from mimix_jax import io_utils

COMPLETE = ".mimix_download_complete"  # JSON, written last: the source is complete


class FetchError(Exception):
  """A source that cannot be fetched as asked (no file matches, an unreadable sources file)."""


@dataclasses.dataclass(frozen=True)
class Source:
  name: str  # the folder under the raw root
  repo: str  # a hub dataset, ORG/NAME
  include: tuple[str, ...]  # the training files: splits meant for evaluation are not fetched
  exclude: tuple[str, ...] = ()


def read_sources(path: str | os.PathLike) -> list[Source]:
  """A JSON list of {"name", "repo", "include": [...], "exclude": [...]}."""
  try:
    rows = json.loads(Path(path).read_text())
    return [Source(r["name"], r["repo"], tuple(r["include"]), tuple(r.get("exclude", ()))) for r in rows]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise FetchError(f"{path}: not a sources file ({type(e).__name__}: {e})") from None


def fetch(source: Source, raw_root: Path, mirror: Path | None = None) -> tuple[Path, bool]:
  """(the source's folder, whether anything was fetched now); an already complete one is left alone."""
  dest = Path(raw_root) / source.name
  want = {"repo": source.repo, "include": list(source.include), "exclude": list(source.exclude)}
  marker = dest / COMPLETE
  if marker.is_file() and {k: v for k, v in json.loads(marker.read_text()).items() if k != "files"} == want:
    return dest, False
  dest.mkdir(parents=True, exist_ok=True)
  if mirror is None:
    from huggingface_hub import snapshot_download
    snapshot_download(source.repo, repo_type="dataset", local_dir=dest, allow_patterns=list(source.include),
                      ignore_patterns=list(source.exclude) or None)
  else:
    _copy(Path(mirror) / "datasets" / source.repo, dest, source)
  files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and not _bookkeeping(p, dest))
  if not files:
    raise FetchError(f"{source.repo}: no file matches {list(source.include)}")
  io_utils.write_json(marker, {**want, "files": files})
  return dest, True


def _copy(repo_dir: Path, dest: Path, source: Source) -> None:
  """The mirror's files that the patterns select, each copied whole under a temporary name and renamed; files
  already there at their full size are kept (an interrupted copy goes on where it stopped)."""
  from huggingface_hub.utils import filter_repo_objects
  if not repo_dir.is_dir():
    raise FetchError(f"{repo_dir}: the mirror has no {source.repo}")
  names = [str(p.relative_to(repo_dir)) for p in repo_dir.rglob("*") if p.is_file()]
  for name in filter_repo_objects(names, allow_patterns=list(source.include),
                                  ignore_patterns=list(source.exclude) or None):
    src, dst = repo_dir / name, dest / name
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
      continue
    dst.parent.mkdir(parents=True, exist_ok=True)
    with io_utils.atomic_file(dst) as tmp:
      shutil.copyfile(src, tmp)


def _bookkeeping(path: Path, dest: Path) -> bool:
  """huggingface_hub's own metadata (.cache/) and our marker are not the dataset's files."""
  rel = path.relative_to(dest).parts
  return rel[0] == ".cache" or path.name == COMPLETE
