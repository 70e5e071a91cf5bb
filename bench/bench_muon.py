"""Muon against AdamW at CPU size: held-out loss against tokens for a small lr sweep of each, and the step time.

    python bench/bench_muon.py [--out DIR] [--steps N] [--adamw_lrs 7.5e-4,1.5e-3,3e-3] [--muon_lrs .015,.03,.06] ...

On the shipped corpus: a tokenizer trained on data/corpus/train, training rows cut from data/corpus/train and
the held-out loss on data/corpus/eval (other books). Every run starts from the same initial weights and sees the
same batches in the same order on the same schedule; Muon's runs give the embedding and norms AdamW at AdamW's
best lr of the sweep, and sweep muon_lr. Writes DIR/results.jsonl (one line per evaluation, one per run, one
summary: the tokens Muon needs to reach AdamW's final held-out loss) and DIR/muon_vs_adamw.png. The step times
are measured after the sweep, the two best configurations alternating `--timing_steps` steps at a time for
`--timing_rounds` rounds, so that load from other processes hits both alike; the overhead compares medians, at
the sweep's batch and at any `--timing_batches` (Newton-Schulz costs the same whatever the batch, so its share
falls as the tokens per step grow).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Twice tiny's layer matrices (d 256 and FFN 768 against 192 and 512), a smaller vocabulary: 3.6M parameters,
# sized so that the whole sweep takes ~15 minutes on a shared 2-core CPU.
MODEL = dict(vocab_size=2048, n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, d_ff=768, scan_layers=False,
             dtype="float32", vocab_multiple=128, attention_q_block=64)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="bench_out/muon")
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--schedule", default="cosine")
  p.add_argument("--adamw_lrs", default="7.5e-4,1.5e-3,3e-3")
  p.add_argument("--muon_lrs", default="0.015,0.03,0.06")
  p.add_argument("--eval_every", type=int, default=25)
  p.add_argument("--eval_rows", type=int, default=64)
  p.add_argument("--timing_steps", type=int, default=10)
  p.add_argument("--timing_rounds", type=int, default=3)
  p.add_argument("--timing_batches", default="", help="more batch sizes to time the two best at, e.g. 32")
  p.add_argument("--model", default="", help="JSON overrides of the model fields (the smoke test shrinks it)")
  p.add_argument("--tokenizer_chars", type=int, default=1_500_000)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def corpus_rows(tok, folder: Path, seq: int, limit_chars: int = 0):
  """Every book of `folder`, tokenized with an end-of-text between books, cut into rows of seq + 1 tokens."""
  import numpy as np
  texts = [gzip.open(f, "rt", encoding="utf-8").read() for f in sorted(folder.glob("*.gz"))]
  if limit_chars:
    texts = [t[:limit_chars] for t in texts]
  ids = np.concatenate([np.asarray(tok.encode(t, eos=True), np.int32) for t in texts])
  n = len(ids) // (seq + 1)
  return ids[: n * (seq + 1)].reshape(n, seq + 1)


def batch_of(rows) -> dict:
  """Rows [b, T + 1] -> the train step's fields (one document per row, every target scored)."""
  import numpy as np
  b, t = rows.shape[0], rows.shape[1] - 1
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": np.ones((b, t), np.float32),
          "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
          "index": np.arange(b)}


def make_cfg(args, model: dict, name: str, lr: float, muon_lr: float):
  from mimix_jax.training import config as config_lib
  cfg = config_lib.defaults()
  cfg.model.update(**model)
  cfg.update(max_len=args.seq, batch_size=args.batch, total_steps=args.steps, seed=args.seed)
  cfg.optimizer.update(name=name, lr=lr, muon_lr=muon_lr, warmup_steps=args.warmup, schedule=args.schedule)
  return cfg


def train_run(args, cfg, train_rows, eval_batches, params0, emit) -> dict:
  """One run of the sweep: held-out loss every eval_every steps (and at 0 and the end), step times."""
  import jax
  import numpy as np
  from mimix_jax.model import sharding
  from mimix_jax.training import objectives
  from mimix_jax.training.step import TrainStep

  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tr = TrainStep(cfg, objectives.from_config(cfg), mesh)
  order = np.random.default_rng(cfg.seed).permutation(len(train_rows))
  run = {"optimizer": cfg.optimizer.name, "lr": cfg.optimizer.lr, "muon_lr": cfg.optimizer.muon_lr}
  curve, times = [], []
  with sharding.activate(mesh):
    state = tr.init_state(cfg.seed, params0)

    def evaluate(step: int) -> None:
      sums = [tr.evaluate(state["params"], tr.device_batch(b, accumulate=False)) for b in eval_batches]
      loss = sum(float(s[0]) for s in sums) / sum(float(s[1]) for s in sums)
      point = {**run, "step": step, "tokens": step * tr.tokens_per_step, "eval_loss": loss}
      curve.append(point)
      emit({"kind": "eval", **point})

    evaluate(0)
    for step in range(cfg.total_steps):
      idx = order[(np.arange(cfg.batch_size) + step * cfg.batch_size) % len(order)]
      batch = tr.device_batch(batch_of(train_rows[idx]))
      t0 = time.perf_counter()
      state, metrics = tr(state, batch)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t0)
      if (step + 1) % args.eval_every == 0 or step + 1 == cfg.total_steps:
        evaluate(step + 1)
  result = {**run, "final_eval_loss": curve[-1]["eval_loss"],
            "median_step_ms": 1e3 * statistics.median(times[1:] or times),  # the first step compiles
            "train_loss_last": float(metrics["loss"]), "tokens": curve[-1]["tokens"]}
  emit({"kind": "run", **result})
  return {**result, "curve": curve, "step": tr, "step_cfg": cfg}


def tokens_to_reach(curve: list[dict], target: float) -> float | None:
  """The first token count at which the held-out curve reaches `target`, linear between evaluations."""
  for prev, point in zip(curve, curve[1:]):
    if point["eval_loss"] <= target:
      frac = (prev["eval_loss"] - target) / (prev["eval_loss"] - point["eval_loss"])
      return prev["tokens"] + frac * (point["tokens"] - prev["tokens"])
  return None


def newton_schulz_flops(model_cfg, ns_steps: int = 5) -> int:
  """Matmul FLOPs of one Muon update's Newton-Schulz iterations (optax's quintic; the smaller side first):
  per iteration A = X X^T (2 m^2 n), A @ A (2 m^3), (b A + c A^2) @ X (2 m^2 n), for every layer's projection."""
  total = 0
  for name, n_in in model_cfg.projection_input_axes().items():
    shape = model_cfg.layer_params()[name][0]
    fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    m, n = min(fan_in, fan_out), max(fan_in, fan_out)
    total += ns_steps * (4 * m * m * n + 2 * m ** 3)
  return model_cfg.n_layers * total


def alternate_timing(args, best: dict, train_rows, batch_size: int) -> dict:
  """Median step ms of each best configuration at `batch_size` rows, the two alternating so that outside load
  hits both alike (the sweep's own train step where the batch is the sweep's)."""
  import jax
  from mimix_jax.model import sharding
  from mimix_jax.training import objectives
  from mimix_jax.training.step import TrainStep
  steps = {}
  for name, run in best.items():
    cfg = run["step_cfg"].copy_and_resolve_references()
    cfg.batch_size = batch_size
    steps[name] = run["step"] if batch_size == args.batch else TrainStep(cfg, objectives.from_config(cfg),
                                                                         run["step"].mesh)
  times, states = {name: [] for name in best}, {}
  batch = batch_of(train_rows[:batch_size])
  for _ in range(args.timing_rounds):
    for name, tr in steps.items():
      with sharding.activate(tr.mesh):
        state = states.get(name) or tr.init_state(args.seed)
        b = tr.device_batch(batch)
        for _ in range(args.timing_steps):
          t0 = time.perf_counter()
          state, metrics = tr(state, b)
          jax.block_until_ready(metrics["loss"])
          times[name].append(time.perf_counter() - t0)
        states[name] = state
  return {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}


def plot(runs: list[dict], best: dict, target: float, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colours = {"adamw": "tab:blue", "muon": "tab:red"}
  for run in runs:
    is_best = run is best[run["optimizer"]]
    lr = run["muon_lr"] if run["optimizer"] == "muon" else run["lr"]
    ax.plot([p["tokens"] / 1e3 for p in run["curve"][1:]], [p["eval_loss"] for p in run["curve"][1:]],
            color=colours[run["optimizer"]], lw=2.2 if is_best else 0.8, alpha=1 if is_best else 0.5,
            label=f"{run['optimizer']} lr {lr:g}" + (" (best)" if is_best else ""))
  ax.axhline(target, color="grey", ls=":", lw=1, label="AdamW's final held-out loss")
  ax.set_xlabel("training tokens (thousands)")
  ax.set_ylabel("held-out loss (nats / token)")
  ax.set_title("Muon vs AdamW, same init, data and schedule")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def environment() -> dict:
  import jax
  import optax
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
  return {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
          "jax": jax.__version__, "optax": optax.__version__, "commit": commit.strip(),
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "devices": f"1 x {jax.default_backend()}"}


def load_corpus(args, vocab_size: int, tok_dir: Path):
  """Training rows of data/corpus/train and held-out batches spread over data/corpus/eval, with a tokenizer
  trained on a seeded sample of the training books (kept in tok_dir for a rerun)."""
  import numpy as np
  from mimix_jax import tokenizer as tokenizer_cmd
  from mimix_jax.text.tokenizer import Tokenizer
  if not (tok_dir / "tokenizer.model").exists():
    assert tokenizer_cmd.main(["--input", str(REPO / "data/corpus/train"), "--vocab_size", str(vocab_size),
                               "--output", str(tok_dir), "--max_chars", str(args.tokenizer_chars), "--seed", "0"]) == 0
  tok = Tokenizer.load(tok_dir)
  train_rows = corpus_rows(tok, REPO / "data/corpus/train", args.seq)
  eval_rows = corpus_rows(tok, REPO / "data/corpus/eval", args.seq)
  eval_rows = eval_rows[np.linspace(0, len(eval_rows) - 1, args.eval_rows).astype(int)]  # spread over both books
  return train_rows, [batch_of(eval_rows[i: i + args.batch])
                      for i in range(0, len(eval_rows) - args.batch + 1, args.batch)]


def time_both(args, best: dict, train_rows, batch_size: int, model_cfg, emit) -> dict:
  step_ms = alternate_timing(args, best, train_rows, batch_size)
  tokens = batch_size * args.seq
  row = {"tokens_per_step": tokens, "adamw_step_ms": step_ms["adamw"], "muon_step_ms": step_ms["muon"],
         "step_time_ratio": step_ms["muon"] / step_ms["adamw"],
         "train_gflop_per_step": model_cfg.flops_per_token(args.seq) * tokens / 1e9}
  emit({"kind": "timing", "batch": batch_size, **row})
  return row


def main(argv=None) -> int:
  args = parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = (out / "results.jsonl").open("w")

  def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)
    results.write(json.dumps(row) + "\n")
    results.flush()

  from mimix_jax.model import transformer
  from mimix_jax.training import config as config_lib

  model = {**MODEL, **json.loads(args.model or "{}")}
  train_rows, eval_batches = load_corpus(args, model["vocab_size"], out / "tokenizer")
  model_cfg = config_lib.model_config(make_cfg(args, model, "adamw", 0.0, 0.0))
  params0 = transformer.init_params(model_cfg, args.seed)
  emit({"kind": "setup", **environment(), "model": model, "params": model_cfg.param_count(),
        "train_rows": len(train_rows), "eval_tokens": len(eval_batches) * args.batch * args.seq,
        "tokens_per_step": args.batch * args.seq, "steps": args.steps, "schedule": args.schedule})

  adamw = [train_run(args, make_cfg(args, model, "adamw", float(lr), 0.0), train_rows, eval_batches, params0, emit)
           for lr in args.adamw_lrs.split(",")]
  best_adamw = min(adamw, key=lambda r: r["final_eval_loss"])
  muon = [train_run(args, make_cfg(args, model, "muon", best_adamw["lr"], float(lr)), train_rows, eval_batches,
                    params0, emit) for lr in args.muon_lrs.split(",")]
  best = {"adamw": best_adamw, "muon": min(muon, key=lambda r: r["final_eval_loss"])}
  target = best_adamw["final_eval_loss"]
  reached = tokens_to_reach(best["muon"]["curve"], target)
  timing = {b: time_both(args, best, train_rows, b, model_cfg, emit)
            for b in [args.batch, *(int(b) for b in args.timing_batches.split(",") if b)]}
  plot(adamw + muon, best, target, out / "muon_vs_adamw.png")
  emit({"kind": "summary", "adamw_best_lr": best_adamw["lr"], "muon_best_lr": best["muon"]["muon_lr"],
        "adamw_final_eval_loss": target, "muon_final_eval_loss": best["muon"]["final_eval_loss"],
        "adamw_tokens": best_adamw["tokens"], "muon_tokens_to_reach_adamw_final": reached,
        "token_ratio": None if reached is None else reached / best_adamw["tokens"],
        **{k: v for k, v in timing[args.batch].items() if k != "tokens_per_step"},
        "newton_schulz_gflop_per_step": newton_schulz_flops(model_cfg) / 1e9, "plot": str(out / "muon_vs_adamw.png")})
  results.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
