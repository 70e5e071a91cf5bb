"""The train loop of one stage: check everything (prepare), then resume or initialise, step, log, evaluate and
checkpoint to total_steps (run).

Running it again on the same run directory resumes exactly from the newest good checkpoint (same data order,
same losses). SIGTERM / SIGINT save a checkpoint at the next step boundary and stop with EXIT_INTERRUPTED; only a
run that reached total_steps exits 0.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import signal
import time
from pathlib import Path

import jax
import ml_collections

from mimix_jax import io_utils
from mimix_jax.data import pipeline, shards
from mimix_jax.evaluation import runner
from mimix_jax.model import sharding
from mimix_jax.model.config import ModelConfig
from mimix_jax.text.tokenizer import Tokenizer
from mimix_jax.training import checkpoints, dpo_reference, objectives, run_dir as run_dir_lib
from mimix_jax.training.metrics import CORE, MetricsLogger
from mimix_jax.training.step import TrainStep

ARCHITECTURE_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "rope_base", "norm_eps",
                       "vocab_multiple", "head_dim", "tie_embeddings", "rope_scaling")
# Exit codes a chain (run_all.sh) and a scheduler (SLURM requeue) can act on; 2 is a user error (train.py).
EXIT_NONFINITE = 3  # max_nonfinite_steps non-finite steps in a row: the run halted
EXIT_SAVE_FAILED = 74  # a checkpoint could not be written (EX_IOERR); the previous one stays
EXIT_INTERRUPTED = 75  # SIGTERM / SIGINT: saved, resumable by running the same command (EX_TEMPFAIL)


class TrainError(Exception):
  """A run that cannot go on, for a reason the user can act on; `exit_code` says which."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


@dataclasses.dataclass
class Prepared:
  """A stage whose config, data, tokenizer and starting point were checked, before anything is written."""

  cfg: ml_collections.ConfigDict
  run_dir: Path
  objective: objectives.Objective
  step: TrainStep
  manifest: dict
  tokenizer_dir: Path
  generation: dict
  tasks: runner.Prepared | None  # eval_tasks: prompts and tokens made once


def prepare(cfg: ml_collections.ConfigDict, run_dir: Path) -> Prepared:
  """Raises ValueError / FileNotFoundError naming the field or file (user errors) and writes nothing.

  An unset model.vocab_size (0) becomes the tokenizer's; any other mismatch is refused, as are shards made with
  another tokenizer, of another objective or max_len, and an init_from of another architecture.
  """
  source = run_dir_lib.read_run_info(cfg.init_from) if cfg.init_from else None
  tokenizer_dir = _tokenizer_dir(cfg, source)
  tok = resolve_vocabulary(cfg, tokenizer_dir)
  objective = objectives.from_config(cfg)
  step = TrainStep(cfg, objective, sharding.make_mesh(**cfg.mesh))
  if source is not None:
    _check_same_architecture(step.model_cfg, source.model, cfg.init_from)
  if not cfg.data.train_path:
    raise ValueError("data.train_path is not set: give --config.data.train_path=SHARD_DIR (python -m mimix_jax.preprocess)")
  manifest = shards.read_manifest(cfg.data.train_path)
  _check_data(cfg, objective, manifest, tok, "data.train_path")
  if cfg.data.eval_path:
    _check_data(cfg, objective, shards.read_manifest(cfg.data.eval_path), tok, "data.eval_path")
  generation = dict(source.generation if source else run_dir_lib.DEFAULT_GENERATION)
  if shards.LAYOUTS[manifest["stage"]].chat:  # trained on conversations: a chat model, no hand edit needed
    generation["mode"] = "chat"
  tasks = None
  if cfg.eval_tasks:
    tasks = runner.prepare(tok, cfg.eval_tasks, cfg.max_len, cfg.eval_task_dir or None, cfg.eval_tasks_fewshot,
                           cfg.eval_tasks_limit or None)
  return Prepared(cfg, Path(run_dir), objective, step, manifest, Path(tokenizer_dir), generation, tasks)


def run(p: Prepared, command: str = "") -> int:
  """Trains to total_steps in the run dir, resuming from its newest good checkpoint; returns an exit code.

  Raises TrainError (a one-line reason and an exit code) and run_dir.RunInUse.
  """
  cfg, step = p.cfg, p.step
  main_process = jax.process_index() == 0
  p.run_dir.mkdir(parents=True, exist_ok=True)
  with run_dir_lib.RunLock(p.run_dir) if main_process else _no_lock():
    if main_process:
      _write_run_files(p, command)
    ckpt = checkpoints.TrainCheckpointer(p.run_dir, cfg.keep_checkpoints, cfg.keep_every)
    restored = ckpt.restore_latest(step.abstract_state, step.state_shardings)
    if restored is None:
      start, data_state = 0, None
      state = step.init_state(cfg.seed, _initial_params(cfg, step))
    else:
      start, state, data_state = restored
      print(f"resumed from {p.run_dir}/checkpoints/{start}", flush=True)
    initial = state["params"] if restored is None else None
    references = dpo_reference.tables(cfg, step, initial, p.run_dir) if p.objective.needs_reference else {}
    iterator = pipeline.make_iterator(
        cfg.data.train_path, stage=p.objective.data_stage, global_batch_size=cfg.batch_size, seed=cfg.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), worker_count=cfg.data.worker_count,
        reference_logps=references.get("train"))
    if data_state is not None:
      iterator.set_state(json.loads(data_state))
    logger = MetricsLogger(p.run_dir, cfg.total_steps, start, step.model_cfg.flops_per_token(cfg.max_len),
                           step.tokens_per_step, enabled=main_process)
    try:
      with _StopFlag() as stop:
        end = _train(cfg, step, state, iterator, ckpt, logger, stop, start, _Evaluator(p, references.get("eval")))
    finally:
      logger.close()
  if main_process:
    print(json.dumps({"objective": cfg.objective, "run_dir": str(p.run_dir), "step": end,
                      "loss": logger.history[-1][1] if logger.history else None}), flush=True)
  return 0


def _train(cfg, step: TrainStep, state, iterator, ckpt, logger, stop, start: int, evaluator: "_Evaluator") -> int:
  """The loop itself; returns the last step trained (total_steps) or raises TrainError."""
  data_state = json.dumps(iterator.get_state()).encode()  # after the last batch trained on
  saver = _Saver(ckpt, logger, start)
  batches = pipeline.prefetch_to_device(iterator, step.device_batch, cfg.data.prefetch)
  n = start
  with sharding.activate(step.mesh):
    try:
      while n < cfg.total_steps and not stop.requested:
        batch, data_state = next(batches)
        state, metrics = step(state, batch)
        n += 1
        ckpt.check()
        if n % cfg.log_every == 0 or n == cfg.total_steps or stop.requested:
          _log(logger, n, jax.device_get(metrics), cfg.max_nonfinite_steps)
        results = evaluator(n, state["params"])
        if results:
          logger.log_eval(n, results)
        saver.maybe_save(n, state, data_state, due=n % cfg.save_every_steps == 0 and n < cfg.total_steps)
      saver.save(n, state, data_state)
      ckpt.close()  # waits for the last save: a failure surfaces here
    except Exception as e:
      failure = _save_failure(e, saver.last_saved)
      try:
        ckpt.close()  # finish the save in flight, if any
      except Exception:  # noqa: BLE001 (its error would hide the one being raised)
        pass
      raise failure or e
  if stop.requested:
    raise TrainError(f"signal received: saved step {saver.last_saved}; run the same command to resume",
                     EXIT_INTERRUPTED)
  return n


def _log(logger: MetricsLogger, n: int, metrics: dict, max_nonfinite: int) -> None:
  record = logger.log(n, metrics)
  if not metrics["finite"]:
    logger.write(f"step {n}: non-finite loss or gradient, update skipped ({metrics['nonfinite_run']} in a row, "
                 f"{metrics['skipped_steps']} in all)")
  if metrics["nonfinite_run"] >= max_nonfinite:
    raise TrainError(f"stopped: {metrics['nonfinite_run']} consecutive non-finite steps (loss {record['loss']}); "
                     "the newest checkpoint holds the last finite state: lower the learning rate, or check the "
                     "data, and resume from it", EXIT_NONFINITE)


class _Saver:
  """Checkpoints every save_every_steps, but never in a run of non-finite steps: its saves would hold the same
  weights at a later data position and could rotate out the last checkpoint taken on the finite path."""

  def __init__(self, ckpt: checkpoints.TrainCheckpointer, logger: MetricsLogger, start: int):
    self.ckpt, self.logger, self.last_saved, self.pending = ckpt, logger, start, False

  def maybe_save(self, n: int, state: dict, data_state: bytes, due: bool) -> None:
    if due or self.pending:
      self.pending = int(jax.device_get(state["nonfinite"])) > 0  # a host sync only at (deferred) saves
      if not self.pending:
        self.save(n, state, data_state)

  def save(self, n: int, state: dict, data_state: bytes) -> None:
    if n != self.last_saved and int(jax.device_get(state["nonfinite"])) == 0:
      self.ckpt.save(n, state, data_state, force=True)
      self.last_saved = n
      self.logger.plot()


def _save_failure(e: Exception, last_saved: int) -> TrainError | None:
  """A failed write into the run directory (a checkpoint in the background, metrics) as a one-line TrainError
  (Orbax wraps the OS error; its root cause is the message)."""
  if isinstance(e, TrainError):
    return None
  cause = e
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  if not isinstance(cause, OSError):
    return None
  return TrainError(f"writing to the run directory failed ({type(cause).__name__}: {cause}); the newest complete "
                    f"checkpoint is step {last_saved}: fix the cause (disk space?) and run the same command to resume",
                    EXIT_SAVE_FAILED)


class _Evaluator:
  """What a run evaluates at step n: the held-out loss (eval_every) and the benchmark tasks (eval_tasks_every);
  both at the end."""

  def __init__(self, p: Prepared, eval_reference):
    self.p, self.eval_reference, self.scorer = p, eval_reference, None

  def __call__(self, n: int, params: dict) -> dict[str, float]:
    cfg, out = self.p.cfg, {}
    last = n == cfg.total_steps
    if cfg.data.eval_path and (last or (cfg.eval_every and n % cfg.eval_every == 0)):
      out.update(evaluate_split(cfg, self.p.step, params, self.eval_reference))
    if self.p.tasks is not None and (last or (cfg.eval_tasks_every and n % cfg.eval_tasks_every == 0)):
      out.update(self._tasks(params))
    return out

  def _tasks(self, params: dict) -> dict[str, float]:
    from mimix_jax.evaluation.scorer import Scorer
    if self.scorer is None:  # compiled once, fed the live params each time
      self.scorer = Scorer(self.p.step.model_cfg, params, self.p.step.mesh)
    self.scorer.params = params
    summary = runner.run(self.scorer, self.p.tasks, progress=False).summary
    out = {CORE: summary["core"]}
    for name, s in summary["tasks"].items():
      out.update({f"tasks/{name}/{k}": s[k] for k in ("acc", "acc_norm") if s[k] is not None})
    return out


def evaluate_split(cfg, step: TrainStep, params, reference_logps) -> dict[str, float]:
  """Loss and metrics (e.g. DPO reward accuracy) over the first eval_steps batches of the held-out split."""
  total, count, sums = 0.0, 0.0, {}
  for _, local in zip(range(cfg.eval_steps), step.eval_iterator(cfg.data.eval_path, cfg.seed, reference_logps)):
    t, c, s = jax.device_get(step.evaluate(params, step.device_batch(local, accumulate=False)))
    total, count = total + float(t), count + float(c)
    sums = {k: sums.get(k, 0.0) + float(v) for k, v in s.items()}
  return {"loss": total / max(count, 1.0), **{k: v / max(count, 1.0) for k, v in sums.items()}}


def resolve_vocabulary(cfg: ml_collections.ConfigDict, tokenizer_dir: str | Path | None = None) -> Tokenizer:
  """The run's tokenizer; an unset model.vocab_size (0) becomes its size, any other must equal it."""
  if tokenizer_dir is None:
    source = run_dir_lib.read_run_info(cfg.init_from) if cfg.init_from else None
    tokenizer_dir = _tokenizer_dir(cfg, source)
  tok = Tokenizer.load(tokenizer_dir)
  if cfg.model.vocab_size == 0:
    cfg.model.vocab_size = tok.vocab_size
  elif cfg.model.vocab_size != tok.vocab_size:
    raise ValueError(f"model.vocab_size is {cfg.model.vocab_size} but the tokenizer {tokenizer_dir} has "
                     f"{tok.vocab_size} ids: set --config.model.vocab_size={tok.vocab_size} (or 0: the tokenizer's)")
  return tok


def _tokenizer_dir(cfg, source: run_dir_lib.RunInfo | None) -> str:
  if cfg.tokenizer_path:
    return cfg.tokenizer_path
  if source is not None:
    return str(source.tokenizer_dir)
  raise ValueError("tokenizer_path is not set: give --config.tokenizer_path=DIR (python -m mimix_jax.tokenizer), "
                   "or init_from a run, whose tokenizer is used")


def _initial_params(cfg: ml_collections.ConfigDict, step: TrainStep) -> dict | None:
  """init_from's params, or None for a fresh initialisation."""
  if not cfg.init_from:
    return None
  params = checkpoints.load_params(cfg.init_from, step.model_cfg, step.state_shardings["params"])
  print(f"initialised params from {cfg.init_from}", flush=True)
  return params


def _check_same_architecture(model_cfg: ModelConfig, source: ModelConfig, init_from: str) -> None:
  """init_from keeps the weights, so every architecture field must match (max_len, dtype, remat may change)."""
  for field in ARCHITECTURE_FIELDS:
    ours, theirs = getattr(model_cfg, field), getattr(source, field)
    if ours != theirs:
      raise ValueError(f"init_from {init_from} has model.{field}={theirs}, this config has {ours} "
                       f"(set --config.model.{field}, or use --config configs/finetune.py:STAGE:{init_from}, "
                       "which takes the model from the run)")


def _check_data(cfg, objective: objectives.Objective, manifest: dict, tok: Tokenizer, field: str) -> None:
  path = cfg.data[field.split(".")[1]]
  if manifest.get("stage") != objective.data_stage:
    raise ValueError(f"{field} {path}: shards are for stage {manifest.get('stage')!r}, objective {cfg.objective!r} "
                     f"trains on {objective.data_stage!r} shards (preprocess --stage {objective.data_stage})")
  if int(manifest.get("max_len", cfg.max_len)) != cfg.max_len:
    raise ValueError(f"{field} {path}: shards have max_len {manifest['max_len']}, config max_len is {cfg.max_len}"
                     f" (re-run preprocessing with --max_len {cfg.max_len} or set --config.max_len)")
  if manifest.get("tokenizer_sha256") not in (None, tok.sha256()):
    raise ValueError(f"{field} {path}: shards were made with the tokenizer {manifest.get('tokenizer')}, not with "
                     f"{Path(tok.model_path).parent} (a different one): re-run preprocessing with this tokenizer")


def _write_run_files(p: Prepared, command: str) -> None:
  run_dir_lib.write_run_info(p.run_dir, p.step.model_cfg, p.tokenizer_dir, p.generation)
  io_utils.write_json(p.run_dir / "config.json", p.cfg.to_dict(), sort_keys=True)
  import flax, optax, orbax.checkpoint as ocp
  io_utils.write_json(p.run_dir / "manifest.json", {
      "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
      "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
      "optax": optax.__version__, "orbax": getattr(ocp, "__version__", "?"),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "processes": jax.process_count(),
      "param_count": p.step.model_cfg.param_count(), "data": p.manifest}, sort_keys=True)


class _no_lock:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


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
