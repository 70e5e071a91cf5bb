"""Train (pretrain / SFT / DPO) one stage: `python -m mimix_jax.train --config FILE.py:STAGE --workdir RUN_DIR`.

Running the same command again resumes exactly from the latest complete checkpoint (same data order, same
losses). `--config.FIELD=VALUE` overrides any config field; `--dry_run` plans memory and FLOPs without training.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--dry_run" in sys.argv:
  # The planner compiles for the configured mesh on virtual CPU devices; must be set before JAX is imported.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import platform
import signal
import time
from pathlib import Path

import jax
import ml_collections

from mimix_jax import checkpoint, config as config_lib, data as data_lib, distributed, dpo_reference, sharding
from mimix_jax import trainer as trainer_lib
from mimix_jax.data.pipeline import prefetch_to_device
from mimix_jax.metrics import MetricsLogger


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="FILE.py:STAGE, e.g. configs/tiny.py:pretrain")
  p.add_argument("--workdir", default=None, help="run directory (default runs/<config name>/<stage>)")
  p.add_argument("--dry_run", action="store_true", help="print parameter count, FLOPs and per-device memory")
  distributed.add_flags(p)
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  return args, rest


def main(argv: list[str] | None = None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    cfg = config_lib.load(args.config, overrides)
    config_lib.validate(cfg)
  except (KeyError, ValueError, FileNotFoundError) as e:
    print(f"train: error: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2
  if args.dry_run:
    from mimix_jax import planner
    planner.report(cfg)
    return 0
  distributed.initialize(args)
  file, _, stage = args.config.partition(":")
  workdir = Path(args.workdir or Path("runs") / Path(file).stem / (stage or "default"))
  return run(cfg, workdir, command=" ".join(sys.argv))


def run(cfg: ml_collections.ConfigDict, run_dir: Path, command: str = "") -> int:
  """Trains to cfg.total_steps in run_dir, resuming from its latest checkpoint; returns an exit code."""
  is_main = jax.process_index() == 0
  model_cfg = config_lib.model_config(cfg)
  mesh = sharding.make_mesh(**cfg.mesh)
  trainer = trainer_lib.build(cfg, model_cfg, mesh)
  run_dir.mkdir(parents=True, exist_ok=True)
  manifest = data_lib.read_manifest(cfg.data.train_path)
  _check_data(cfg, manifest)
  if is_main:
    _write_run_files(cfg, model_cfg, run_dir, manifest, command)

  ckpt = checkpoint.TrainCheckpointer(run_dir, cfg.keep_checkpoints, cfg.keep_every)
  iterator = data_lib.make_iterator(
      cfg.data.train_path, stage=cfg.stage, global_batch_size=cfg.batch_size, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), worker_count=cfg.data.worker_count)
  start = ckpt.latest_step()
  if start is not None:
    state, data_state, meta = ckpt.restore(start, trainer.abstract_state, trainer.state_shardings)
    iterator.set_state(json.loads(data_state))
    nonfinite_run = meta.get("nonfinite_run", 0)
    print(f"resumed from {run_dir}/checkpoints/{start}", flush=True)
  else:
    start, nonfinite_run = 0, 0
    params = None
    if cfg.init_from:
      _check_same_architecture(model_cfg, checkpoint.read_run_info(cfg.init_from).model, cfg.init_from)
      params = checkpoint.load_params(cfg.init_from, model_cfg, trainer.state_shardings["params"])
      print(f"initialised params from {cfg.init_from}", flush=True)
    state = trainer.init_state(cfg.seed, params)

  references = dpo_reference.build(cfg, trainer, state["params"], run_dir, resumed=start > 0) if cfg.stage == "dpo" else {}
  reference = references.get("train")
  step_fn = trainer.train_step()
  tokens_per_step = cfg.batch_size * cfg.max_len * (2 if cfg.stage == "dpo" else 1)
  logger = MetricsLogger(run_dir, cfg.total_steps, start, model_cfg.flops_per_token(cfg.max_len), tokens_per_step,
                         enabled=is_main)
  stop = _StopFlag()

  last_saved = start
  data_state = json.dumps(iterator.get_state()).encode()  # after the last batch trained on

  def save(step, force=False):
    nonlocal last_saved
    ckpt.save(step, state, data_state, {"nonfinite_run": nonfinite_run}, force=force)
    last_saved = step
    logger.plot()

  def put(local):
    extra = None if reference is None else trainer.device_batch({"r": reference.lookup(local)})["r"]
    return trainer.device_batch(local), extra

  batches = prefetch_to_device(iterator, put, cfg.data.prefetch)
  step, exit_code = start, 0
  with sharding.activate(mesh):
    while step < cfg.total_steps:
      (batch, extra), data_state = next(batches)
      state, metrics = step_fn(state, batch, extra)
      step += 1
      if step % cfg.log_every == 0 or step == cfg.total_steps or stop.requested:
        metrics = jax.device_get(metrics)
        nonfinite_run = 0 if metrics["finite"] else nonfinite_run + 1
        record = logger.log(step, metrics)
        if not metrics["finite"]:
          logger.write(f"step {step}: non-finite loss or gradient, update skipped ({nonfinite_run} in a row)")
        if nonfinite_run >= cfg.max_nonfinite_steps:
          logger.write(f"stopping: {nonfinite_run} consecutive non-finite steps (loss {record['loss']})")
          exit_code = 3
          break
      if cfg.data.eval_path and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.total_steps):
        logger.log_eval(step, evaluate_split(cfg, trainer, state["params"], references.get("eval")))
      if step % cfg.save_every_steps == 0 and step < cfg.total_steps:
        save(step)
      if stop.requested:
        logger.write(f"signal received: saving step {step} and exiting")
        break
    if step != last_saved:
      save(step, force=True)
    ckpt.close()
  logger.close()
  stop.restore()
  if is_main and exit_code == 0:
    print(json.dumps({"stage": cfg.stage, "run_dir": str(run_dir), "step": step,
                      "loss": logger.history[-1][1] if logger.history else None}), flush=True)
  return exit_code


def evaluate_split(cfg, trainer, params, reference) -> dict[str, float]:
  """Loss and metrics (e.g. DPO reward accuracy) over the first eval_steps batches of the held-out split."""
  micro = cfg.batch_size // cfg.grad_accum_steps
  iterator = data_lib.make_iterator(
      cfg.data.eval_path, stage=cfg.stage, global_batch_size=micro, seed=cfg.seed, shuffle=False, num_epochs=1,
      process_index=jax.process_index(), process_count=jax.process_count(), drop_remainder=False)
  eval_fn = trainer.eval_step()
  total, count, sums = 0.0, 0.0, {}
  for _, local in zip(range(cfg.eval_steps), iterator):
    extra = None if reference is None else trainer.device_batch({"r": reference.lookup(local)}, False)["r"]
    t, c, s = jax.device_get(eval_fn(params, trainer.device_batch(local, accumulate=False), extra))
    total, count = total + float(t), count + float(c)
    sums = {k: sums.get(k, 0.0) + float(v) for k, v in s.items()}
  return {"loss": total / max(count, 1.0), **{k: v / max(count, 1.0) for k, v in sums.items()}}


ARCHITECTURE_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "rope_base", "norm_eps",
                      "vocab_multiple")


def _check_same_architecture(model_cfg, source, init_from: str) -> None:
  """init_from keeps the weights, so every architecture field must match (max_len, dtype, remat may change)."""
  for field in ARCHITECTURE_FIELDS:
    ours, theirs = getattr(model_cfg, field), getattr(source, field)
    if ours != theirs:
      raise ValueError(f"init_from {init_from} has model.{field}={theirs}, this config has {ours} "
                       f"(set --config.model.{field}={theirs})")


def _check_data(cfg, manifest: dict) -> None:
  if manifest.get("stage") != cfg.stage:
    raise ValueError(f"{cfg.data.train_path}: shards are for stage {manifest.get('stage')!r}, config trains {cfg.stage!r}")
  if int(manifest.get("vocab_size", 0)) > cfg.model.vocab_size:
    raise ValueError(f"{cfg.data.train_path}: tokenizer has {manifest['vocab_size']} ids, the model only "
                     f"{cfg.model.vocab_size} (set --config.model.vocab_size={manifest['vocab_size']})")
  if int(manifest.get("max_len", cfg.max_len)) != cfg.max_len:
    raise ValueError(f"{cfg.data.train_path}: shards have max_len {manifest['max_len']}, config max_len is {cfg.max_len}"
                     f" (re-run preprocessing with --max_len {cfg.max_len} or set --config.max_len)")


def _write_run_files(cfg, model_cfg, run_dir: Path, data_manifest: dict, command: str) -> None:
  tokenizer_dir = cfg.tokenizer_path or None
  generation = dict(checkpoint.DEFAULT_GENERATION)
  if cfg.init_from:
    source = checkpoint.read_run_info(cfg.init_from)
    generation = source.generation
    tokenizer_dir = tokenizer_dir or source.tokenizer_dir
  if cfg.stage in ("sft", "dpo"):  # the run is a chat model now: no hand edit needed (the reference needs one)
    generation = {**generation, "mode": "chat"}
  if tokenizer_dir and not Path(tokenizer_dir).exists():
    raise FileNotFoundError(f"tokenizer_path {tokenizer_dir} does not exist")
  checkpoint.write_run_info(run_dir, model_cfg, tokenizer_dir, generation)
  checkpoint.write_json_atomic(run_dir / "config.json", cfg.to_dict())
  import flax, optax, orbax.checkpoint as ocp
  checkpoint.write_json_atomic(run_dir / "manifest.json", {
      "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
      "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
      "optax": optax.__version__, "orbax": getattr(ocp, "__version__", "?"),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "processes": jax.process_count(),
      "param_count": model_cfg.param_count(), "data": data_manifest})


class _StopFlag:
  """SIGTERM / SIGINT request a checkpoint and a clean exit at the next step boundary (until `restore`)."""

  def __init__(self):
    self.requested = False
    self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

  def restore(self):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    if self.requested:  # a second signal: stop now
      raise KeyboardInterrupt
    self.requested = True


if __name__ == "__main__":
  sys.exit(main())
