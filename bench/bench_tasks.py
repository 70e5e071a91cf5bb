"""Benchmark tasks: our evaluator vs `lm_eval --model hf` on our export, same tasks and examples, on this machine.

    python bench/bench_tasks.py [--preset tiny] [--n_eval 100] [--num_fewshot 0] [--tasks a,b] [--rounds 1]
        [--hf_threads 1 2] [--run RUN --export DIR] [--json FILE]

The model is a randomly initialised run of --preset (the speed does not depend on the weights) with a tokenizer
trained on the shipped corpus, exported with `mimix_jax.export`; or pass an existing --run and its --export.
The task files are sample_tasks' (n_eval rows per task, shipped text); both sides read the same files.

Each side runs in its own fresh process, one after the other (XLA's and PyTorch's thread pools starve each other
when they share a CPU), and is timed from after its model is loaded to its last metric: reading the task files,
building the prompts, tokenizing, scoring, metrics. Ours includes its compiles; lm-eval's `datasets` cache of the
files is warmed by an untimed --limit 1 run first. lm-eval runs at its defaults (batch size 1, the export's
float32) through HFLM + simple_evaluate, with the faster of the --hf_threads torch thread counts (2 threads
collapse when other processes load the CPUs). peak_rss_mb: the process's peak resident memory (its whole life:
model, framework and data). Prints one JSON line (also appended to --json).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import lm_eval_harness as harness  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "corpus" / "train"


def make_run(preset_name: str, root: Path) -> tuple[Path, Path]:
  """A random-init run of the preset with a tokenizer of its vocabulary size, and its export."""
  from mimix_jax import export, tokenizer
  from mimix_jax.model import transformer
  from mimix_jax.model.config import preset
  from mimix_jax.training import checkpoints, run_dir
  cfg = preset(preset_name)
  assert tokenizer.main(["--input", str(DATA), "--vocab_size", str(cfg.vocab_size), "--output", str(root / "tokenizer"),
                         "--max_chars", "2000000", "--seed", "0"]) == 0
  run = root / "run"
  run_dir.write_run_info(run, cfg, root / "tokenizer", dict(run_dir.DEFAULT_GENERATION))
  checkpoints.save_params(run, 0, transformer.init_params(cfg, seed=0))
  export.export(run, root / "hf", verify=False)
  return run, root / "hf"


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def ours(run: str, task_dir: str, tasks: list[str], num_fewshot: int) -> dict:
  from mimix_jax import evaluate
  from mimix_jax.evaluation import runner
  from mimix_jax.evaluation.scorer import Scorer
  from mimix_jax.text.tokenizer import Tokenizer
  import jax
  info, params, mesh = evaluate.open_run(run)
  scorer, tok = Scorer(info.model, params, mesh), Tokenizer.load(info.tokenizer_dir)
  t0 = time.perf_counter()
  ev = runner.evaluate_tasks(scorer, tok, tasks, task_dir, num_fewshot, progress=False)
  seconds = time.perf_counter() - t0
  return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "jax": jax.__version__,
          "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "acc": {t: s["acc"] for t, s in ev.summary["tasks"].items()}}


def theirs(export_dir: str, config_dir: str, names: list[str], num_fewshot: int, threads: int, cache: str,
           limit: int | None = None) -> dict:
  os.environ.update(harness.offline_env(cache))  # before `datasets` is imported: it reads them once
  import torch
  torch.set_num_threads(threads)
  import lm_eval
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager
  lm = HFLM(pretrained=export_dir, device="cpu")
  t0 = time.perf_counter()
  out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                task_manager=TaskManager(include_path=config_dir, include_defaults=False))
  seconds = time.perf_counter() - t0
  return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "torch": torch.__version__, "lm_eval": lm_eval.__version__,
          "acc": {n[len(harness.PREFIX):]: r["acc,none"] for n, r in out["results"].items()}}


def in_fresh_process(fn, *args) -> dict:
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
    return pool.submit(fn, *args).result()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="tiny", help="model preset of the random-init run (without --run)")
  p.add_argument("--run", default=None, help="an existing run directory (with --export)")
  p.add_argument("--export", default=None, help="the run's Hugging Face export")
  p.add_argument("--tasks", default=",".join(harness.LM_EVAL_YAML))
  p.add_argument("--n_eval", type=int, default=100, help="examples per task")
  p.add_argument("--num_fewshot", type=int, default=0)
  p.add_argument("--rounds", type=int, default=1, help="alternating rounds of ours / lm-eval (medians reported)")
  p.add_argument("--hf_threads", nargs="+", type=int, default=[1, 2])
  p.add_argument("--workdir", default=None, help="where the run, export and task files go (default: a temp dir)")
  p.add_argument("--json", default=None, help="append the JSON line here")
  args = p.parse_args(argv)
  if (args.run is None) != (args.export is None):
    p.error("--run and --export go together")

  from mimix_jax.evaluation import sample_tasks, tasks as tasks_lib
  names = [t.name for t in tasks_lib.get(args.tasks)]
  root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_tasks_"))
  root.mkdir(parents=True, exist_ok=True)
  if args.run is None and (root / "run").exists():
    p.error(f"{root} already holds a run: pass a new --workdir, or --run {root / 'run'} --export {root / 'hf'}")
  run, export_dir = (Path(args.run), Path(args.export)) if args.run else in_fresh_process(make_run, args.preset, root)
  files = {n: s for n, s in sample_tasks.write(root / "tasks", args.n_eval, max(10, args.num_fewshot + 1)).items()
           if n in names}
  config_dir, cache = root / "configs", str(root / "cache")
  lm_names = harness.write_configs(files, config_dir)
  in_fresh_process(theirs, str(export_dir), str(config_dir), lm_names, args.num_fewshot, 1, cache, 1)  # warm cache

  runs = {"mimix": [], **{f"lm_eval_{t}": [] for t in args.hf_threads}}
  for _ in range(args.rounds):
    runs["mimix"].append(in_fresh_process(ours, str(run), str(root / "tasks"), names, args.num_fewshot))
    for t in args.hf_threads:
      runs[f"lm_eval_{t}"].append(in_fresh_process(theirs, str(export_dir), str(config_dir), lm_names,
                                                   args.num_fewshot, t, cache))
  examples = args.n_eval * len(names)
  best_t = min(args.hf_threads, key=lambda t: statistics.median(r["seconds"] for r in runs[f"lm_eval_{t}"]))
  side = lambda rs: {"seconds": statistics.median(r["seconds"] for r in rs),
                     "examples_per_sec": examples / statistics.median(r["seconds"] for r in rs),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
  mine, ref = runs["mimix"][-1], runs[f"lm_eval_{best_t}"][-1]
  result = {"bench": "tasks", "preset": None if args.run else args.preset, "run": str(run), "tasks": names,
            "examples": examples, "num_fewshot": args.num_fewshot, "rounds": args.rounds,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "jax": mine["jax"], "device": mine["device"], "torch": ref["torch"],
            "lm_eval": ref["lm_eval"], "mimix": side(runs["mimix"]),
            "lm_eval_hf": {**side(runs[f"lm_eval_{best_t}"]), "torch_threads": best_t},
            "same_accuracy": mine["acc"] == ref["acc"]}
  result["speedup"] = result["mimix"]["examples_per_sec"] / result["lm_eval_hf"]["examples_per_sec"]
  print(json.dumps(result), flush=True)
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(result) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
