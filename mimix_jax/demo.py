"""`make demo`: the whole pipeline on the shipped data with the tiny model, on a CPU.

tokenizer -> pretrain preprocessing -> pretrain -> length extension -> SFT preprocessing -> SFT -> DPO
preprocessing -> DPO -> perplexity -> export (verified) -> one chat reply. Each stage is one of the project's
own commands run as a subprocess (exactly what a user would type; printed before it runs). A stage whose output
is complete is reused, so re-running is cheap; `make demo-clean` starts over.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mimix_jax.training.metrics import read_jsonl

DATA = Path(__file__).resolve().parents[1] / "data"
TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa", "boolq", "lambada_openai")


def sh(cmd: list[str], summary: list[str], name: str) -> str:
  print(f"\n=== {name}\n$ {shlex.join(cmd)}", flush=True)
  t0 = time.perf_counter()
  out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
  sys.stdout.write(out.stdout)
  if out.returncode:
    sys.exit(f"demo: stage {name!r} failed (exit {out.returncode}): {shlex.join(cmd)}")
  summary.append(f"{name:<18} {time.perf_counter() - t0:7.1f} s")
  return out.stdout


def last_json(stdout: str) -> dict:
  for line in reversed(stdout.strip().splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  return {}


def split_pairs(source: Path, train: Path, held_out: Path, every: int = 10, max_train: int = 480) -> None:
  """Every `every`-th preference pair is held out (by line, deterministic); `max_train` of the others, evenly spread
  over the file (it is sorted by topic), train.

  DPO computes reference log-probs for every pair before training; 480 pairs cover the demo's 40 steps of 8 pairs.
  """
  if train.exists() and held_out.exists():
    return
  train.parent.mkdir(parents=True, exist_ok=True)
  lines = gzip.open(source, "rt").read().splitlines()
  held_out.write_text("".join(l + "\n" for i, l in enumerate(lines) if i % every == 0))
  others = [l for i, l in enumerate(lines) if i % every]
  train.write_text("".join(l + "\n" for l in others[:: max(1, len(others) // max_train)][:max_train]))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--workdir", default="demo_out")
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (tests use < 1)")
  args = p.parse_args(argv)
  out = Path(args.workdir)
  py = [sys.executable, "-m"]
  summary: list[str] = []
  tok = out / "tokenizer"

  def train(stage: str, extra=()):
    from mimix_jax.training import config as config_lib
    steps = max(int(config_lib.load(f"{args.config}:{stage}").total_steps * args.scale), 2)
    run_dir = out / "runs" / stage
    overrides = [f"--config.tokenizer_path={tok}", f"--config.data.train_path={out}/data/{_data_name(stage)}",
                 f"--config.init_from={out}/runs/{_previous(stage)}" if _previous(stage) else "--config.init_from="]
    sh(py + ["mimix_jax.train", "--config", f"{args.config}:{stage}", "--workdir", str(run_dir), *overrides,
             f"--config.total_steps={steps}", *extra], summary, stage)

  if not (tok / "tokenizer.model").exists():
    sh(py + ["mimix_jax.tokenizer", "--input", str(DATA / "corpus/train"), "--vocab_size", "4096",
             "--output", str(tok)], summary, "tokenizer")

  def preprocess(stage: str, name: str, inputs: list[str], max_len: int, extra=()):
    if not (out / "data" / name / "manifest.json").exists():
      sh(py + ["mimix_jax.preprocess", "--stage", stage, "--tokenizer", str(tok), "--input", *inputs,
               "--output", str(out / "data" / name), "--max_len", str(max_len), *extra], summary, f"prep {name}")

  preprocess("pretrain", "pretrain_128", [str(DATA / "corpus/train")], 128)
  preprocess("pretrain", "pretrain_256", [str(DATA / "corpus/train")], 256)
  train("pretrain")
  train("pretrain_2048")
  preprocess("sft", "sft", [str(DATA / "chat/sft/chatterbot_en.jsonl.gz")], 256, ["--pack"])
  train("sft")
  split_pairs(DATA / "chat/dpo/chatterbot_mismatch_pairs.jsonl.gz", out / "raw/dpo_train.jsonl",
              out / "raw/dpo_heldout.jsonl")
  preprocess("dpo", "dpo", [str(out / "raw/dpo_train.jsonl")], 128)
  preprocess("dpo", "dpo_heldout", [str(out / "raw/dpo_heldout.jsonl")], 128)
  train("dpo", [f"--config.data.eval_path={out}/data/dpo_heldout", "--config.eval_steps=100"])

  print_summary(out, summary, *evaluate(out, py, summary))
  return 0


def evaluate(out: Path, py: list[str], summary: list[str]) -> tuple[dict, str, dict]:
  """Perplexity, the verified export, a chat reply and the benchmark table of the final (DPO) model."""
  ppl = last_json(sh(py + ["mimix_jax.evaluate", "--checkpoint", str(out / "runs/dpo"), "--data",
                           str(DATA / "corpus/eval"), "--output", str(out / "ppl.json")], summary, "perplexity"))
  if not (out / "export" / "export.json").exists():  # written last, once the export is verified
    sh(py + ["mimix_jax.export", "--checkpoint", str(out / "runs/dpo"), "--output", str(out / "export")],
       summary, "export")
  # A 2.4M-parameter model's greedy reply can be one whitespace piece repeated; the original's repetition
  # penalty keeps it to words.
  reply = sh(py + ["mimix_jax.generate", "--checkpoint", str(out / "runs/dpo"), "--chat", "--greedy",
                   "--repetition_penalty", "1.2", "--max_new_tokens", "40", "--prompt", "What is AI?"],
             summary, "chat reply")
  if not (out / "tasks" / "piqa.jsonl").exists():
    from mimix_jax.evaluation import sample_tasks
    sample_tasks.write(out / "tasks")  # small files in each benchmark's schema, made from the shipped books
  tasks = last_json(sh(py + ["mimix_jax.evaluate", "--checkpoint", str(out / "runs/dpo"), "--tasks", ",".join(TASKS),
                             "--task_dir", str(out / "tasks"), "--output", str(out / "tasks.json")],
                       summary, "benchmark tasks"))
  return ppl, reply, tasks


def print_tasks(result: dict) -> None:
  """The benchmark table (a 2.4M-parameter model on synthetic task files: near chance is expected)."""
  fmt = lambda x: "    -" if x is None else f"{x:.3f}"
  print("\nbenchmark tasks (lm-eval's scoring, 0-shot, sample files in data's schemas; chance level expected):")
  for name, r in result["tasks"].items():
    print(f"  {name:<15} n {r['n']:>3}  acc {fmt(r['acc'])}  acc_norm {fmt(r['acc_norm'])}")
  print(f"  {'CORE':<15} {result['core']:.3f}")


def print_summary(out: Path, timings: list[str], ppl: dict, reply: str, tasks: dict) -> None:
  print("\n=== summary")
  print("\n".join(timings))
  for stage in ("pretrain", "pretrain_2048", "sft", "dpo"):
    losses = [r["loss"] for r in read_jsonl(out / "runs" / stage / "metrics.jsonl")]
    print(f"{stage:<14} loss {losses[0]:.3f} -> {losses[-1]:.3f} ({len(losses)} logged steps)")
  held_out = read_jsonl(out / "runs/dpo/eval.jsonl")[-1]
  print(f"dpo held-out pairs: reward accuracy {held_out['rewards/accuracies']:.2f}, "
        f"reward margin {held_out['rewards/margins']:.2f}")
  if ppl:
    print(f"perplexity on data/corpus/eval: {ppl['ppl']:.2f} over {ppl['tokens']} tokens")
  print(f"\nrun directories: {out}/runs/{{pretrain,pretrain_2048,sft,dpo}} (loss curves: loss.png in each)")
  print(f"export (Hugging Face format): {out}/export")
  print(f"chat reply to 'What is AI?': {reply.strip()}")
  print(f"start chatting: python -m mimix_jax.chat --checkpoint {out}/runs/dpo   (or launch/chat.sh {out}/runs/dpo)")
  print_tasks(tasks)


def _data_name(stage: str) -> str:
  return {"pretrain": "pretrain_128", "pretrain_2048": "pretrain_256"}.get(stage, stage)


def _previous(stage: str) -> str | None:
  return {"pretrain_2048": "pretrain", "sft": "pretrain_2048", "dpo": "sft"}.get(stage)


if __name__ == "__main__":
  sys.exit(main())
