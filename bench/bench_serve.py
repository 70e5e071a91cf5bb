"""Serving speed: the real server under 1, 8 and 16 concurrent streams vs the same requests one after another,
and vs transformers' `generate` on the export of the same run. One JSON line per preset.

    python bench/bench_serve.py [--presets tiny base] [--concurrency 1 8 16] [--max_tokens 64] [--json FILE]

Per preset: a run with random weights (the preset's architecture, the context cut to --context, a 4096-id
tokenizer trained here on the shipped books, so base's vocabulary is 4096, not 50256), served by
`python -m mimix_jax.serve --max_batch 16` in its own process. Each request is a streamed greedy
/v1/completions call (a line of a shipped book, max_tokens new tokens; the usage chunk gives the count).
Every prefill bucket is compiled by one warm-up pass first.

  tok_s     generated tokens / wall time from the first request sent to the last reply's end, all streams
  ttft_ms   median time from sending a request to its first chunk (sent at its first token)
  speedup   tok_s with c concurrent streams / tok_s of the same c requests sent one after another

transformers: LlamaForCausalLM.from_pretrained(export) in a fresh process, greedy, exactly each request's token
count (no eos), one request after another (batch 1) and the 16 together (left-padded batch), on the faster of 1
and 2 torch threads. The clients run on the same CPU as the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "data" / "corpus" / "train" / "shakespeare_macbeth.txt.gz"
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}


def make_run(root: Path, name: str, context: int) -> Path:
  """A run directory: random weights of the preset (seed 0), a 4096-id tokenizer, raw mode."""
  from mimix_jax.model import transformer
  from mimix_jax.model.config import preset
  from mimix_jax.training import checkpoints, run_dir
  tok = root / "tokenizer"
  if not tok.exists():
    subprocess.run([sys.executable, "-m", "mimix_jax.tokenizer", "--input", str(BOOK.parent), "--vocab_size",
                    "4096", "--output", str(tok), "--max_chars", "1500000"], check=True, env=ENV, capture_output=True)
  cfg = preset(name, vocab_size=4096, max_len=context, dtype="float32", scan_layers=False)
  run = root / name
  run_dir.write_run_info(run, cfg, tok, dict(run_dir.DEFAULT_GENERATION))
  checkpoints.save_params(run, 1, transformer.init_params(cfg, seed=0))
  return run


def prompts(n: int) -> list[str]:
  lines = [line.strip() for line in gzip.open(BOOK, "rt", encoding="utf-8") if len(line.strip()) > 40]
  return lines[100:100 + n]


def stream(url: str, prompt: str, max_tokens: int) -> tuple[float, float, float, int]:
  """(sent, first text chunk, end) times and the completion token count of one streamed request."""
  body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}}
  sent, first, tokens = time.perf_counter(), None, 0
  with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
    for line in r.iter_lines():
      if not line.startswith("data: {"):
        continue
      chunk = json.loads(line[6:])
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      elif first is None:  # the server sends the first chunk at the first token
        first = time.perf_counter()
  end = time.perf_counter()
  return sent, first or end, end, tokens


def load(url: str, requests: list[str], max_tokens: int, together: bool) -> dict:
  """tok_s and ttft_ms of the requests, all at once or one after another."""
  t0 = time.perf_counter()
  if together:
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
      rows = list(pool.map(lambda p: stream(url, p, max_tokens), requests))
  else:
    rows = [stream(url, p, max_tokens) for p in requests]
  wall = max(r[2] for r in rows) - t0
  return dict(tok_s=round(sum(r[3] for r in rows) / wall, 1),
              ttft_ms=round(statistics.median(r[1] - r[0] for r in rows) * 1e3, 1), tokens=[r[3] for r in rows])


def serve_numbers(run: Path, requests: list[str], levels: list[int], max_tokens: int) -> tuple[dict, list[int]]:
  """Per concurrency level: the numbers both ways and the speed-up; and each request's token count."""
  import portpicker
  port = portpicker.pick_unused_port()
  proc = subprocess.Popen([sys.executable, "-m", "mimix_jax.serve", "--checkpoint", str(run), "--port", str(port),
                           "--max_batch", str(max(levels)), "--model_name", "bench"], env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  try:
    while True:
      try:
        if httpx.get(url + "/health", timeout=1).status_code == 200:
          break
      except httpx.TransportError:
        assert proc.poll() is None, "the server exited"
        time.sleep(0.5)
    load(url, requests, max_tokens, together=False)  # compiles every prefill bucket
    out, counts = {}, []
    for c in levels:
      together = load(url, requests[:c], max_tokens, together=True)
      alone = load(url, requests[:c], max_tokens, together=False)
      counts = alone.pop("tokens")
      assert together.pop("tokens") == counts  # greedy: the same replies either way
      out[c] = dict(concurrent=together, sequential=alone, speedup=round(together["tok_s"] / alone["tok_s"], 2))
    return out, counts
  finally:
    proc.terminate()
    proc.wait()


def hf_numbers(export: Path, ids: list[list[int]], counts: list[int], threads: int) -> dict:
  """transformers generate on the export: one request after another, and all in one left-padded batch."""
  import torch
  from transformers import AutoModelForCausalLM
  torch.set_num_threads(threads)
  model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()

  def generate(rows: list[list[int]], n: int) -> float:
    width = max(map(len, rows))
    x = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    t = time.perf_counter()
    with torch.inference_mode():
      model.generate(input_ids=x, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                     eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - t

  generate(ids[:1], 4)  # warm-up
  seq = sum(generate([r], n) for r, n in zip(ids, counts))
  ttft = statistics.median(generate([r], 1) for r in ids)
  batch = generate(ids, max(counts))
  return dict(threads=threads, sequential_tok_s=round(sum(counts) / seq, 1), ttft_ms=round(ttft * 1e3, 1),
              batch_tok_s=round(len(ids) * max(counts) / batch, 1))


def hf_in_fresh_process(export: Path, ids, counts, threads: int) -> dict:
  code = ("import json, sys; sys.path.insert(0, %r); from bench.bench_serve import hf_numbers; "
          "print(json.dumps(hf_numbers(*json.loads(sys.stdin.read()))))" % str(REPO))
  r = subprocess.run([sys.executable, "-c", code], input=json.dumps([str(export), ids, counts, threads]),
                     capture_output=True, text=True, env=ENV, check=True)
  return json.loads(r.stdout.splitlines()[-1])


def bench_preset(root: Path, name: str, args) -> dict:
  from mimix_jax.text.tokenizer import Tokenizer
  run = make_run(root, name, args.context)
  requests = prompts(max(args.concurrency))
  serve, counts = serve_numbers(run, requests, args.concurrency, args.max_tokens)
  row = dict(bench="serve", preset=name, context=args.context, max_tokens=args.max_tokens, serve=serve)
  if args.hf:
    export = root / f"{name}_hf"
    subprocess.run([sys.executable, "-m", "mimix_jax.export", "--checkpoint", str(run), "--output", str(export),
                    "--no-verify", "--overwrite"], check=True, env=ENV, capture_output=True)
    tok = Tokenizer.load(run / "tokenizer")
    ids = [tok.encode(p, bos=True) for p in requests][:len(counts)]
    hf = [hf_in_fresh_process(export, ids, counts, t) for t in (1, 2)]
    row["hf"] = max(hf, key=lambda h: h["sequential_tok_s"])
  return row


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--presets", nargs="+", default=["tiny", "base"])
  p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 16])
  p.add_argument("--max_tokens", type=int, default=64)
  p.add_argument("--context", type=int, default=256, help="the served model's context (cache slots per stream)")
  p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="also time transformers")
  p.add_argument("--json", help="append the JSON lines to this file")
  args = p.parse_args(argv)
  import jax
  machine = f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.presets:
      row = {**bench_preset(Path(tmp), name, args), "machine": machine, "jax": jax.__version__,
             "date": time.strftime("%Y-%m-%d")}
      line = json.dumps(row)
      print(line, flush=True)
      if args.json:
        with open(args.json, "a") as f:
          f.write(line + "\n")


if __name__ == "__main__":
  main()
