"""The train loop of one stage: resume or initialise, then step, log, evaluate and checkpoint to total_steps.

Running it again on the same run directory resumes exactly from the latest complete checkpoint (same data order,
same losses). SIGTERM / SIGINT save a checkpoint at the next step boundary and stop.
"""

from __future__ import annotations

import json
import platform
import signal
import time
from pathlib import Path

import jax
import ml_collections

from mimix_jax import io_utils
from mimix_jax.data import pipeline, shards
from mimix_jax.model import sharding
from mimix_jax.model.config import ModelConfig
from mimix_jax.training import checkpoints, dpo_reference, objectives, run_dir as run_dir_lib
from mimix_jax.training.metrics import MetricsLogger
from mimix_jax.training.step import TrainStep

ARCHITECTURE_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "rope_base", "norm_eps",
                       "vocab_multiple")
NONFINITE_EXIT = 3  # too many non-finite steps in a row


def run(cfg: ml_collections.ConfigDict, run_dir: Path, command: str = "") -> int:
  """Trains to cfg.total_steps in run_dir, resuming from its latest checkpoint; returns an exit code."""
  objective = objectives.from_config(cfg)
  mesh = sharding.make_mesh(**cfg.mesh)
  step = TrainStep(cfg, objective, mesh)
  manifest = shards.read_manifest(cfg.data.train_path)
  _check_data(cfg, objective, manifest)
  run_dir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    _write_run_files(cfg, step.model_cfg, run_dir, manifest, command)

  ckpt = checkpoints.TrainCheckpointer(run_dir, cfg.keep_checkpoints, cfg.keep_every)
  start = ckpt.latest_step()
  state = initial = None
  if start is None:
    start = 0
    state = step.init_state(cfg.seed, _initial_params(cfg, step))
    initial = state["params"]
  references = dpo_reference.tables(cfg, step, initial, run_dir) if objective.needs_reference else {}
  iterator = pipeline.make_iterator(
      cfg.data.train_path, stage=objective.data_stage, global_batch_size=cfg.batch_size, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), worker_count=cfg.data.worker_count,
      reference_logps=references.get("train"))
  meta = {"nonfinite_run": 0}
  if state is None:
    state, data_state, meta = ckpt.restore(start, step.abstract_state, step.state_shardings)
    iterator.set_state(json.loads(data_state))
    print(f"resumed from {run_dir}/checkpoints/{start}", flush=True)

  logger = MetricsLogger(run_dir, cfg.total_steps, start, step.model_cfg.flops_per_token(cfg.max_len),
                         step.tokens_per_step, enabled=jax.process_index() == 0)
  with _StopFlag() as stop:
    exit_code, end = _train(cfg, step, state, iterator, ckpt, logger, stop, start, meta, references.get("eval"))
  logger.close()
  if jax.process_index() == 0 and exit_code == 0:
    print(json.dumps({"objective": cfg.objective, "run_dir": str(run_dir), "step": end,
                      "loss": logger.history[-1][1] if logger.history else None}), flush=True)
  return exit_code


def _initial_params(cfg: ml_collections.ConfigDict, step: TrainStep) -> dict | None:
  """init_from's params (checked to be the same architecture), or None for a fresh initialisation."""
  if not cfg.init_from:
    return None
  _check_same_architecture(step.model_cfg, run_dir_lib.read_run_info(cfg.init_from).model, cfg.init_from)
  params = checkpoints.load_params(cfg.init_from, step.model_cfg, step.state_shardings["params"])
  print(f"initialised params from {cfg.init_from}", flush=True)
  return params


def _train(cfg, step: TrainStep, state, iterator, ckpt, logger, stop, start: int, meta: dict, eval_reference):
  """The loop itself; returns (exit code, the last step trained)."""
  nonfinite_run = meta.get("nonfinite_run", 0)
  data_state = json.dumps(iterator.get_state()).encode()  # after the last batch trained on
  last_saved = n = start
  exit_code = 0

  def save(force=False):
    nonlocal last_saved
    ckpt.save(n, state, data_state, {"nonfinite_run": nonfinite_run}, force=force)
    last_saved = n
    logger.plot()

  batches = pipeline.prefetch_to_device(iterator, step.device_batch, cfg.data.prefetch)
  with sharding.activate(step.mesh):
    while n < cfg.total_steps:
      batch, data_state = next(batches)
      state, metrics = step(state, batch)
      n += 1
      if n % cfg.log_every == 0 or n == cfg.total_steps or stop.requested:
        metrics = jax.device_get(metrics)
        nonfinite_run = 0 if metrics["finite"] else nonfinite_run + 1
        record = logger.log(n, metrics)
        if not metrics["finite"]:
          logger.write(f"step {n}: non-finite loss or gradient, update skipped ({nonfinite_run} in a row)")
        if nonfinite_run >= cfg.max_nonfinite_steps:
          logger.write(f"stopping: {nonfinite_run} consecutive non-finite steps (loss {record['loss']})")
          exit_code = NONFINITE_EXIT
          break
      if cfg.data.eval_path and ((cfg.eval_every and n % cfg.eval_every == 0) or n == cfg.total_steps):
        logger.log_eval(n, evaluate_split(cfg, step, state["params"], eval_reference))
      if n % cfg.save_every_steps == 0 and n < cfg.total_steps:
        save()
      if stop.requested:
        logger.write(f"signal received: saving step {n} and exiting")
        break
    if n != last_saved:
      save(force=True)
    ckpt.close()
  return exit_code, n


def evaluate_split(cfg, step: TrainStep, params, reference_logps) -> dict[str, float]:
  """Loss and metrics (e.g. DPO reward accuracy) over the first eval_steps batches of the held-out split."""
  total, count, sums = 0.0, 0.0, {}
  for _, local in zip(range(cfg.eval_steps), step.eval_iterator(cfg.data.eval_path, cfg.seed, reference_logps)):
    t, c, s = jax.device_get(step.evaluate(params, step.device_batch(local, accumulate=False)))
    total, count = total + float(t), count + float(c)
    sums = {k: sums.get(k, 0.0) + float(v) for k, v in s.items()}
  return {"loss": total / max(count, 1.0), **{k: v / max(count, 1.0) for k, v in sums.items()}}


def _check_same_architecture(model_cfg: ModelConfig, source: ModelConfig, init_from: str) -> None:
  """init_from keeps the weights, so every architecture field must match (max_len, dtype, remat may change)."""
  for field in ARCHITECTURE_FIELDS:
    ours, theirs = getattr(model_cfg, field), getattr(source, field)
    if ours != theirs:
      raise ValueError(f"init_from {init_from} has model.{field}={theirs}, this config has {ours} "
                       f"(set --config.model.{field}={theirs})")


def _check_data(cfg, objective: objectives.Objective, manifest: dict) -> None:
  if manifest.get("stage") != objective.data_stage:
    raise ValueError(f"{cfg.data.train_path}: shards are for stage {manifest.get('stage')!r}, objective "
                     f"{cfg.objective!r} trains on {objective.data_stage!r} shards")
  if int(manifest.get("vocab_size", 0)) > cfg.model.vocab_size:
    raise ValueError(f"{cfg.data.train_path}: tokenizer has {manifest['vocab_size']} ids, the model only "
                     f"{cfg.model.vocab_size} (set --config.model.vocab_size={manifest['vocab_size']})")
  if int(manifest.get("max_len", cfg.max_len)) != cfg.max_len:
    raise ValueError(f"{cfg.data.train_path}: shards have max_len {manifest['max_len']}, config max_len is {cfg.max_len}"
                     f" (re-run preprocessing with --max_len {cfg.max_len} or set --config.max_len)")


def _write_run_files(cfg, model_cfg: ModelConfig, run_dir: Path, data_manifest: dict, command: str) -> None:
  tokenizer_dir = cfg.tokenizer_path or None
  generation = dict(run_dir_lib.DEFAULT_GENERATION)
  if cfg.init_from:
    source = run_dir_lib.read_run_info(cfg.init_from)
    generation = source.generation
    tokenizer_dir = tokenizer_dir or source.tokenizer_dir
  if shards.LAYOUTS[data_manifest["stage"]].chat:  # trained on conversations: a chat model, no hand edit needed
    generation = {**generation, "mode": "chat"}
  if tokenizer_dir and not Path(tokenizer_dir).exists():
    raise FileNotFoundError(f"tokenizer_path {tokenizer_dir} does not exist")
  run_dir_lib.write_run_info(run_dir, model_cfg, tokenizer_dir, generation)
  io_utils.write_json(run_dir / "config.json", cfg.to_dict(), sort_keys=True)
  import flax, optax, orbax.checkpoint as ocp
  io_utils.write_json(run_dir / "manifest.json", {
      "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
      "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
      "optax": optax.__version__, "orbax": getattr(ocp, "__version__", "?"),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "processes": jax.process_count(),
      "param_count": model_cfg.param_count(), "data": data_manifest}, sort_keys=True)


class _StopFlag:
  """SIGTERM / SIGINT request a checkpoint and a clean exit at the next step boundary, while in the block."""

  def __enter__(self):
    self.requested = False
    self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    if self.requested:  # a second signal: stop now
      raise KeyboardInterrupt
    self.requested = True
