"""Checkpoint stall: what an asynchronous save costs the train steps around it, next to a blocking save.

    python bench/bench_checkpoint.py [--shape cpu_base] [--saves 3] [--window 3] [--json FILE]

Our train step (bench/train_throughput.py's shapes) with the real TrainCheckpointer (Orbax, asynchronous) writing
the whole train state to a temporary directory. Three kinds of window of `window` steps each, alternating so
that load from other processes hits them alike:
  plain  no save;
  async  save() (the training loop waits for this call: the copy to host memory and the hand-off), then the
         steps, which share the cores and memory bandwidth with the background write;
  sync   save() and wait_until_finished(), then the steps: what a blocking checkpoint costs.
stall = the window's time (save included) - window x the median plain step, median over `saves` windows;
async_pending_after_window_s > 0 says the window was too short to hold the whole background write.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_throughput import SHAPES, emit, jax_runner  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="cpu_base", choices=sorted(SHAPES))
  p.add_argument("--saves", type=int, default=3, help="windows of each kind")
  p.add_argument("--window", type=int, default=3, help="train steps per window")
  p.add_argument("--json", default=None, help="append the JSON line here")
  args = p.parse_args(argv)
  if args.saves < 1 or args.window < 1:
    p.error(f"--saves and --window must be >= 1, got {args.saves} and {args.window}")

  import jax
  from mimix_jax.training.checkpoints import TrainCheckpointer
  shape = SHAPES[args.shape]
  step, _ = jax_runner(shape, shape["batch"], attention="xla", remat=shape["remat"], loss_chunk=shape["loss_chunk"],
                       scan_layers=None)
  state = step()  # compile
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

  with tempfile.TemporaryDirectory() as tmp:
    ckpt = TrainCheckpointer(tmp, keep=1)
    plain, pending, windows, calls = [], [], {"async": [], "sync": []}, {"async": [], "sync": []}
    n_saved = 0

    def window(kind: str) -> None:
      nonlocal state, n_saved
      t0 = time.perf_counter()
      if kind != "plain":
        n_saved += 1
        ckpt.save(n_saved, state, b"{}")
        if kind == "sync":
          ckpt.wait()
        calls[kind].append(time.perf_counter() - t0)
      for _ in range(args.window):
        t1 = time.perf_counter()
        state = step()
        if kind == "plain":
          plain.append(time.perf_counter() - t1)
      if kind != "plain":
        windows[kind].append(time.perf_counter() - t0)
      t2 = time.perf_counter()
      ckpt.wait()  # outside the window, so that the next one starts with no write in flight
      if kind == "async":
        pending.append(time.perf_counter() - t2)

    for _ in range(args.saves):
      for kind in ("plain", "async", "sync"):
        window(kind)
    ckpt.close()

  step_s = statistics.median(plain)
  result = {"bench": "checkpoint", "shape": args.shape, "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "jax": jax.__version__, "state_gib": state_bytes / 2**30, "window_steps": args.window, "step_s": step_s}
  for kind in ("async", "sync"):
    result[f"{kind}_save_call_s"] = statistics.median(calls[kind])
    result[f"{kind}_stall_s"] = statistics.median(w - args.window * step_s for w in windows[kind])
  # > 0: the write outlasted the window, and the steps after it (not timed) shared the machine with it too.
  result["async_pending_after_window_s"] = max(pending)
  emit(result, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
