"""Download a recipe's raw datasets: `python -m mimix_jax.download --sources SOURCES.json --raw DIR [--mirror DIR]`.

Each source (data/download.py) lands in DIR/NAME with only its training files; a complete one is skipped, an
interrupted one resumes. --mirror reads a local copy laid out as the hub (the rehearsal's) through the same
patterns. Prints a line per source; exit 2 on a user error, 1 when the hub cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from mimix_jax.data import download


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mimix_jax.download", description=__doc__.split("\n\n")[0])
  p.add_argument("--sources", required=True, help="a JSON list of {name, repo, include, exclude}")
  p.add_argument("--raw", required=True, help="where each source's folder goes")
  p.add_argument("--mirror", default=None, help="a local mirror (MIRROR/datasets/ORG/NAME/...) instead of the hub")
  p.add_argument("--only", nargs="+", default=None, help="the sources of these names")
  args = p.parse_args(argv)
  try:
    sources = download.read_sources(args.sources)
    sources = [s for s in sources if args.only is None or s.name in args.only]
    for source in sources:
      dest, fetched = download.fetch(source, Path(args.raw), Path(args.mirror) if args.mirror else None)
      print(f"{'fetched' if fetched else 'have'} {source.repo} -> {dest}", flush=True)
  except download.FetchError as e:
    print(f"download: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # the network, the disk
    print(f"download: error: {type(e).__name__}: {e}; run again to resume", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
