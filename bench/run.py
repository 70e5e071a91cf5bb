"""One entry point for the benchmarks: `python -m bench.run --suite cpu|gpu [--json FILE]`.

cpu: train step (tiny and base shapes) vs PyTorch, checkpoint stall, decode vs transformers.generate, the server
     under 1 / 8 / 16 streams, tokenizer / preprocessing / loader. gpu: bench/gpu.sh (the prepared one-call script for a lent GPU machine).
Every benchmark prints its own table or JSON line; --json collects the JSON lines. Numbers go to BENCHMARKS.md
with the machine, versions and date. Benchmarks never run in `make test`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
  p.add_argument("--json", default=str(BENCH / "results" / f"{time.strftime('%Y-%m-%d')}.jsonl"))
  args = p.parse_args(argv)
  Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  if args.suite == "gpu":
    return subprocess.call(["bash", str(BENCH / "gpu.sh")])
  py = [sys.executable]
  runs = [
      py + [str(BENCH / "train_throughput.py"), "--shape", "cpu_tiny", "--json", args.json],
      py + [str(BENCH / "train_throughput.py"), "--shape", "cpu_base", "--steps", "4", "--rounds", "2", "--json", args.json],
      py + [str(BENCH / "bench_checkpoint.py"), "--json", args.json],
      py + [str(BENCH / "bench_decode.py")],
      py + [str(BENCH / "bench_serve.py"), "--json", args.json],
      py + [str(BENCH / "bench_data.py"), "--json", args.json],
      py + [str(BENCH / "bench_tokenizers.py"), "--json", args.json],
  ]
  failed = 0
  for cmd in runs:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    failed += subprocess.call(cmd, env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}) != 0
  print(f"\nresults appended to {args.json}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
