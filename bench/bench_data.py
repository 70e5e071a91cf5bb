"""Data-path speed on this machine: tokenizer training, preprocessing, and the Grain loader.

    python bench/bench_data.py [--vocab_size 8000] [--copies 4] [--json results.jsonl] [--smoke]

  tokenizer   `python -m mimix_jax.tokenizer` on data/corpus/train (5.4 MB): wall time of the whole command and
              the peak resident memory of its process (ru_maxrss of the child).
  preprocess  `python -m mimix_jax.preprocess --stage pretrain --max_len 1024` on `--copies` copies of the corpus
              (so process start-up is a small part), with --workers 1 and 2: document tokens / the run's own
              seconds (the command's time minus interpreter start), the command's wall time, and tokens per
              CPU-second of the command and its workers (robust to other load on a shared machine).
  loader      `make_iterator` over those shards (worker_count 0): tokens per second of `next()` at batch 64 x 1024,
              next to what the tiny model (CPU, measured) and the large model (8 x H100 at 50% MFU, computed from
              the PaLM FLOP count) consume per second.
Prints a Markdown table; --json appends one JSON object per result. Each step runs in a fresh subprocess
except the loader, so numbers are not polluted by earlier steps' memory. --smoke runs everything at toy size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus" / "train"
H100_BF16_PEAK = 989e12  # dense FLOP/s
TINY_CPU_TOKENS_PER_S = 3500  # issue 9: the tiny model's train step on this 2-core CPU, about 3.5k tokens/s


def run(cmd: list[str]) -> tuple[float, float, str]:
  """Wall seconds, CPU seconds (the command and its worker processes) and stdout of a command that must succeed."""
  def cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime

  t0, c0 = time.perf_counter(), cpu()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  wall, cpu_seconds = time.perf_counter() - t0, cpu() - c0
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
  return wall, cpu_seconds, proc.stdout


def bench_tokenizer(work: Path, vocab: int, corpus: list[Path]) -> dict:
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  wall, _, _ = run([sys.executable, "-m", "mimix_jax.tokenizer", "--input", *map(str, corpus), "--vocab_size", str(vocab),
                 "--output", str(work / "tok")])
  peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  report = json.loads((work / "tok" / "training_report.json").read_text())
  return {"bench": "tokenizer_train", "vocab_size": vocab, "chars": report["chars_sampled"], "seconds": round(wall, 2),
          "sample_seconds": report["sample_seconds"], "train_seconds": report["train_seconds"],
          # the first child of this process: ru_maxrss is its own peak (later children are smaller)
          "peak_rss_mb": round(peak_kb / 1024, 1) if peak_kb > before else None}


def bench_preprocess(work: Path, inputs: list[Path], workers: int, max_len: int) -> dict:
  out = work / f"pretrain_w{workers}"
  wall, cpu_seconds, stdout = run([sys.executable, "-m", "mimix_jax.preprocess", "--stage", "pretrain", "--tokenizer", str(work / "tok"),
                      "--input", *map(str, inputs), "--output", str(out), "--max_len", str(max_len),
                      "--workers", str(workers), "--overwrite"])
  seconds = float(re.search(r" in ([0-9.]+)s \(", stdout).group(1))
  tokens = json.loads((out / "manifest.json").read_text())["tokens"]
  return {"bench": "preprocess_pretrain", "workers": workers, "tokens": tokens, "seconds": round(seconds, 2),
          "tokens_per_s": round(tokens / seconds), "command_seconds": round(wall, 2),
          "tokens_per_cpu_s": round(tokens / cpu_seconds)}


def bench_loader(shards: Path, batch: int, steps: int) -> dict:
  from mimix_jax.data.pipeline import make_iterator
  from mimix_jax.data.shards import read_manifest

  max_len = read_manifest(shards)["max_len"]
  it = make_iterator(str(shards), stage="pretrain", global_batch_size=batch, seed=0)
  next(it)  # start-up (thread pool, first mmap) is not throughput
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  seconds = time.perf_counter() - t0
  return {"bench": "loader_pretrain", "batch": batch, "max_len": max_len, "steps": steps,
          "tokens_per_s": round(steps * batch * max_len / seconds)}


def large_model_tokens_per_s(max_len: int) -> float:
  from mimix_jax.model.config import preset

  return 8 * 0.5 * H100_BF16_PEAK / preset("large").flops_per_token(max_len)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--vocab_size", type=int, default=8000)
  p.add_argument("--copies", type=int, default=4, help="corpus copies preprocessed (amortizes start-up)")
  p.add_argument("--max_len", type=int, default=1024)
  p.add_argument("--loader_batch", type=int, default=64)
  p.add_argument("--loader_steps", type=int, default=200)
  p.add_argument("--json", default=None, help="append results as JSON lines to this file")
  p.add_argument("--smoke", action="store_true", help="toy sizes, for the test suite")
  args = p.parse_args(argv)
  corpus = sorted(CORPUS.glob("*.txt.gz"))
  if args.smoke:
    corpus = [CORPUS / "shakespeare_sonnets.txt.gz"]
    args.vocab_size, args.copies, args.max_len, args.loader_batch, args.loader_steps = 600, 2, 64, 4, 5
  results = []
  with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
    work = Path(tmp)
    results.append(bench_tokenizer(work, args.vocab_size, corpus))
    copies = work / "copies"
    copies.mkdir()
    for k in range(args.copies):
      for f in corpus:
        os.symlink(f, copies / f"{k}_{f.name}")
    for workers in (1, 2):
      results.append(bench_preprocess(work, [copies], workers, args.max_len))
    results.append(bench_loader(work / "pretrain_w1", args.loader_batch, args.loader_steps))
  large = large_model_tokens_per_s(args.max_len)
  import grain, numpy, sentencepiece

  machine = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "python": platform.python_version(),
             "sentencepiece": sentencepiece.__version__, "grain": grain.__version__, "numpy": numpy.__version__,
             "load_avg_1m": round(os.getloadavg()[0], 2)}
  print(f"machine: {machine}")
  print("| benchmark | setting | result |\n|---|---|---|")
  for r in results:
    if r["bench"] == "tokenizer_train":
      print(f"| tokenizer training | vocab {r['vocab_size']}, {r['chars']:,} chars | {r['seconds']} s "
            f"(sampling {r['sample_seconds']} s, SentencePiece {r['train_seconds']} s), peak RSS {r['peak_rss_mb']} MB |")
    elif r["bench"] == "preprocess_pretrain":
      print(f"| preprocess pretrain | {r['workers']} worker(s), {r['tokens']:,} tokens, max_len {args.max_len} | "
            f"{r['tokens_per_s']:,} tokens/s ({r['seconds']} s; command {r['command_seconds']} s); "
            f"{r['tokens_per_cpu_s']:,} tokens per CPU-second |")
    else:
      print(f"| loader (Grain, 0 workers) | batch {r['batch']} x {r['max_len']} | {r['tokens_per_s']:,} tokens/s "
            f"= {r['tokens_per_s'] / TINY_CPU_TOKENS_PER_S:,.0f}x the tiny model on this CPU, "
            f"{r['tokens_per_s'] / large:.1f}x the large model on 8 H100 at 50% MFU ({large:,.0f} tokens/s) |")
  if args.json:
    with open(args.json, "a") as f:
      for r in results:
        f.write(json.dumps({**r, **machine}) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
