"""lm-evaluation-harness as the reference: local task configs over our task files, `lm_eval --model hf` on an
export, offline, and its per-example samples read back.

Each local config `include`s the installed lm-eval's own YAML for the task (prompt, splits, metrics, process_docs
all stay lm-eval's) and changes only where the rows come from: `dataset_path: json` (or parquet) with
`data_files` naming our files per split. The tasks are registered as mimix_NAME so they never shadow lm-eval's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Our task name -> its YAML under lm_eval/tasks (lm-eval 0.4.13).
LM_EVAL_YAML = {
    "hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
    "boolq": "super_glue/boolq/default.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
}
PREFIX = "mimix_"


def lm_eval_tasks_dir() -> Path:
  import importlib.util
  spec = importlib.util.find_spec("lm_eval")
  if spec is None:
    raise RuntimeError("lm_eval is not installed (it is a test dependency: make venv installs it)")
  return Path(spec.submodule_search_locations[0]) / "tasks"


def write_configs(files: dict[str, dict[str, Path]], out: str | Path, cache_dir: str | Path | None = None) -> list[str]:
  """One YAML per task in `files` ({task: {split: path}}, as sample_tasks.write returns); the lm-eval names.

  cache_dir: where `datasets` keeps its converted copy of the files (default: its own, under ~/.cache)."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  names = []
  for task, splits in files.items():
    kind = {".jsonl": "json", ".parquet": "parquet"}[next(iter(splits.values())).suffix]
    data_files = "".join(f"    {split}: {Path(path).resolve()}\n" for split, path in splits.items())
    cache = f"  cache_dir: {Path(cache_dir).resolve()}\n" if cache_dir else ""
    (out / f"{PREFIX}{task}.yaml").write_text(
        f"include: {lm_eval_tasks_dir() / LM_EVAL_YAML[task]}\ntask: {PREFIX}{task}\ndataset_path: {kind}\n"
        f"dataset_name: null\ndataset_kwargs:\n{cache}  data_files:\n{data_files}")
    names.append(PREFIX + task)
  return names


def offline_env(cache: str | Path) -> dict[str, str]:
  """No hub access (everything is local), and `datasets` caches under `cache` rather than in ~/.cache."""
  return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
          "HF_DATASETS_CACHE": str(Path(cache) / "datasets"), "HF_HOME": str(Path(cache) / "hf")}


def command(export_dir: str | Path, config_dir: str | Path, names: list[str], num_fewshot: int,
            output: str | Path, limit: int | None = None) -> list[str]:
  """`lm_eval --model hf --model_args pretrained=DIR` with its defaults (batch size 1, the export's dtype)."""
  cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export_dir}",
         "--tasks", ",".join(names), "--include_path", str(config_dir), "--num_fewshot", str(num_fewshot),
         "--device", "cpu", "--log_samples", "--output_path", str(output)]
  return cmd + (["--limit", str(limit)] if limit else [])


def start(export_dir, config_dir, names, num_fewshot, output, cache, limit=None,
          threads: int | None = None) -> subprocess.Popen:
  """Starts lm_eval (see command()); finish() waits for it. threads: torch's (OMP_NUM_THREADS); on a CPU shared
  with other work 1 avoids OpenMP's spin-waiting, which made the requests 15x slower on a busy 2-core machine.
  It does not change what is computed."""
  env = {**offline_env(cache), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
  Path(output).mkdir(parents=True, exist_ok=True)
  with open(Path(output) / "lm_eval.log", "w") as log:  # a file, not a pipe: a full pipe would stall it
    return subprocess.Popen(command(export_dir, config_dir, names, num_fewshot, output, limit), env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> None:
  if proc.wait():
    log = Path(proc.args[proc.args.index("--output_path") + 1]) / "lm_eval.log"
    raise RuntimeError(f"lm_eval failed ({proc.returncode}):\n{log.read_text()[-4000:]}")


def run(*args, **kwargs) -> None:
  finish(start(*args, **kwargs))


def read_samples(output: str | Path) -> tuple[dict, dict[str, list[dict]]]:
  """(results json, {our task name: its samples in doc order}) of an lm_eval --log_samples run."""
  output = Path(output)
  results = json.loads(max(output.rglob("results_*.json")).read_text())
  samples = {}
  for path in output.rglob("samples_*.jsonl"):
    name = path.name[len("samples_"):].rsplit("_", 1)[0]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    samples[name[len(PREFIX):]] = sorted(rows, key=lambda r: r["doc_id"])
  return results, samples


def requests_of(sample: dict) -> list[tuple[str, str]]:
  """A sample's (context, continuation) requests, in choice order."""
  args = sample["arguments"]
  return [(args[f"gen_args_{i}"]["arg_0"], args[f"gen_args_{i}"]["arg_1"]) for i in range(len(args))]


def responses_of(sample: dict) -> tuple[list[float], list[bool]]:
  """A sample's (log-likelihoods, greedy flags), one per request."""
  resps = sample["filtered_resps"]
  return [float(ll) for ll, _ in resps], [g in (True, "True") for _, g in resps]
