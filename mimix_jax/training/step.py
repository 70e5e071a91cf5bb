"""The train step: the sharded train state and the train and eval functions, each compiled once.

State: {"params": pure dict (float32 master weights), "opt_state": optax state, "step", "nonfinite", "skipped":
int32}. Params and the optimizer moments are sharded by the logical-axis rules; the batch is sharded over
data x fsdp. One train step scans over A micro-batches (gradient accumulation), sums the objective's token- (or
pair-) weighted losses and gradients, divides once by the global count, clips, and applies the optimizer.

A non-finite loss or gradient leaves params and optimizer state unchanged and is counted on the device, every
step, with no host sync: `nonfinite` is the current run of them, `skipped` the total. Once `nonfinite` reaches
max_nonfinite_steps the step stops doing anything (the run has halted), so that the host, which looks only when
it logs or saves, finds the state exactly as it was at the halt.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mimix_jax.data import batch as batch_lib, pipeline
from mimix_jax.model import sharding, transformer
from mimix_jax.training import config as config_lib, optimizer
from mimix_jax.training.objectives import Objective

SCALARS = ("step", "nonfinite", "skipped")  # the state's int32 counters


class TrainStep:
  """What a run needs to step, for one config, objective and mesh: `step(state, batch) -> (state, metrics)`.

  It owns the batch arithmetic (micro-batches, tokens per step) and compiles the train and eval functions
  once, on first use.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, objective: Objective, mesh: Mesh):
    self.model_cfg = config_lib.model_config(cfg)
    self.objective, self.mesh = objective, mesh
    self.batch_size, self.grad_accum, self.max_len = cfg.batch_size, cfg.grad_accum_steps, cfg.max_len
    self.micro_batch = self._micro_batch(mesh)
    self.max_nonfinite = cfg.max_nonfinite_steps
    self.tokens_per_step = self.batch_size * objective.sequences_per_example * self.max_len
    if self.model_cfg.n_kv_heads % mesh.shape["tensor"]:
      raise ValueError(f"model.n_kv_heads {self.model_cfg.n_kv_heads} is not divisible by mesh.tensor "
                       f"{mesh.shape['tensor']}")
    self.tx = optimizer.make(cfg.optimizer, cfg.total_steps, self.model_cfg.projection_input_axes())
    self.lr_schedule = optimizer.schedule(cfg.optimizer, cfg.total_steps)
    abstract_params = transformer.abstract_params(self.model_cfg)
    param_sh = transformer.param_shardings(self.model_cfg, mesh)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    self.abstract_state = {"params": abstract_params, "opt_state": abstract_opt, **{k: scalar for k in SCALARS}}
    self.state_shardings = {"params": param_sh, "opt_state": _mirror_param_shardings(abstract_opt, param_sh, mesh),
                            **{k: NamedSharding(mesh, P()) for k in SCALARS}}

  def _micro_batch(self, mesh: Mesh) -> int:
    if self.grad_accum < 1 or self.batch_size % self.grad_accum:
      raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum_steps {self.grad_accum}")
    micro = self.batch_size // self.grad_accum
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % dp:
      raise ValueError(f"the micro-batch {micro} (batch_size {self.batch_size} / grad_accum_steps {self.grad_accum})"
                       f" is not divisible by the data-parallel size mesh.data x mesh.fsdp = {dp}")
    return micro

  # ----- state and batches -----

  def init_state(self, seed: int, params: dict | None = None) -> dict:
    """Fresh state (params from `seed`, or the given params, e.g. from init_from), laid out on the mesh."""
    def init(params):
      if params is None:
        params = transformer.init_params(self.model_cfg, seed)
      zero = jnp.zeros((), jnp.int32)
      return {"params": params, "opt_state": self.tx.init(params), **{k: zero for k in SCALARS}}
    with sharding.activate(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings)(params)

  def device_batch(self, local: dict[str, np.ndarray], accumulate: bool = True,
                   fields: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """Process-local numpy batch [b, ...] -> global arrays of `fields` (default: the objective's); with
    accumulate, [A, B/A, ...] micro-batches."""
    out = {}
    for key in fields or self.objective.batch_fields:
      value = local[key]
      if accumulate:
        value = value.reshape(self.grad_accum, value.shape[0] // self.grad_accum, *value.shape[1:])
      out[key] = jax.make_array_from_process_local_data(
          sharding.batch_sharding(self.mesh, value.ndim, accumulate), value)
    return out

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one step's global batch [A, B/A, ...] (for the planner)."""
    pair = (2,) if self.objective.sequences_per_example == 2 else ()
    shapes = {k: ((*pair, self.max_len), np.dtype(d)) for k, d in batch_lib.FIELDS.items()}
    shapes[batch_lib.REFERENCE_LOGPS] = ((2,), np.dtype(np.float32))
    out = {}
    for key in self.objective.batch_fields:
      tail, dtype = shapes[key]
      shape = (self.grad_accum, self.micro_batch, *tail)
      out[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(self.mesh, len(shape), True))
    return out

  def eval_iterator(self, path: str, seed: int, reference_logps: np.ndarray | None = None):
    """One pass over a held-out split in micro-batches, the last one padded (padding rows weigh nothing)."""
    return pipeline.make_iterator(
        path, stage=self.objective.data_stage, global_batch_size=self.micro_batch, seed=seed, shuffle=False,
        num_epochs=1, process_index=jax.process_index(), process_count=jax.process_count(), drop_remainder=False,
        reference_logps=reference_logps)

  # ----- the compiled functions -----

  def __call__(self, state: dict, batch: dict[str, jax.Array]) -> tuple[dict, dict[str, jax.Array]]:
    """One optimizer step on micro-batches [A, B/A, ...]; `state` is donated."""
    return self._train(state, batch)

  def evaluate(self, params: dict, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, dict]:
    """(loss sum, count, metric sums) of one unaccumulated batch, replicated."""
    return self._eval(params, batch)

  def lower(self, state, batch):
    """The train function lowered for abstract `state` and `batch` (the planner compiles it)."""
    return self._train.lower(state, batch)

  @functools.cached_property
  def _train(self):
    replicated = NamedSharding(self.mesh, P())
    return jax.jit(self._train_fn, donate_argnums=0, out_shardings=(self.state_shardings, replicated))

  @functools.cached_property
  def _eval(self):
    return jax.jit(self._loss, out_shardings=NamedSharding(self.mesh, P()))

  def _loss(self, params: dict, batch: dict[str, jax.Array]):
    return self.objective.loss(transformer.from_params(self.model_cfg, params), batch)

  def _train_fn(self, state: dict, batch: dict[str, jax.Array]):
    params = state["params"]

    def micro(carry, mb):
      def f(p):
        total, count, sums = self._loss(p, mb)
        return total, (count, sums)
      (total, (count, sums)), grads = jax.value_and_grad(f, has_aux=True)(params)
      return jax.tree.map(jnp.add, carry, (grads, total, count, sums)), None

    _, _, sums_shape = jax.eval_shape(self._loss, params, jax.tree.map(lambda x: x[0], batch))
    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grad_sum, total, count, sums), _ = jax.lax.scan(micro, init, batch)

    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    loss = total / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    halted = state["nonfinite"] >= self.max_nonfinite
    update = finite & ~halted
    updates, new_opt = self.tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(update, n, o), new, old)
    moved = lambda new, old: jnp.where(halted, old, new)
    new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, state["opt_state"]),
                 "step": moved(state["step"] + 1, state["step"]),
                 "nonfinite": moved(jnp.where(finite, 0, state["nonfinite"] + 1), state["nonfinite"]),
                 "skipped": moved(state["skipped"] + (~finite).astype(jnp.int32), state["skipped"])}
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.lr_schedule(state["step"]), "count": count,
               "finite": finite, "nonfinite_run": new_state["nonfinite"], "skipped_steps": new_state["skipped"],
               **{k: v / denom for k, v in sums.items()}}
    return new_state, metrics


def _mirror_param_shardings(abstract_opt: Any, param_sh: dict, mesh: Mesh) -> Any:
  """Optimizer subtrees shaped like the params (Adam moments, Muon momentum) get the params' shardings; the rest
  replicated. A partitioned optimizer's subtrees hold optax.MaskedNode where another one owns the param."""
  params_def = jax.tree.structure(param_sh)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  is_params = lambda node: not masked(node) and jax.tree.structure(node, is_leaf=masked) == params_def
  mirror = lambda node: jax.tree.map(lambda x, s: x if masked(x) else s, node, param_sh, is_leaf=masked)
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda node: mirror(node) if is_params(node) else replicated, abstract_opt, is_leaf=is_params)
