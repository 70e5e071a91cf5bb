"""The sharded train state and the jitted train / eval steps.

State: {"params": pure dict (float32 master weights), "opt_state": optax state, "step": int32}. Params and the
optimizer moments are sharded by the logical-axis rules; the batch is sharded over data x fsdp. One train step
scans over A micro-batches (gradient accumulation), sums token-weighted losses and gradients, divides once by the
global token (or pair) count, clips, and applies AdamW; a non-finite loss or gradient leaves the state unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mimix_jax import losses, optim, sharding
from mimix_jax import model as model_lib
from mimix_jax.model_config import ModelConfig

LossFn = Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class Trainer:
  """What a run needs to step: the mesh, shardings, optimizer and jitted functions."""

  model_cfg: ModelConfig
  mesh: Mesh
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  graphdef: Any
  abstract_state: dict
  state_shardings: dict
  loss_fn: LossFn
  grad_accum: int

  def init_state(self, seed: int, params: dict | None = None) -> dict:
    """Fresh state (params from `seed`, or the given params, e.g. from init_from), laid out on the mesh."""
    def init(params):
      if params is None:
        params = nnx.to_pure_dict(nnx.state(model_lib.create(self.model_cfg, seed), nnx.Param))
      return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}
    with sharding.activate(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings)(params)

  def batch_sharding(self, ndim: int, accumulate: bool) -> NamedSharding:
    lead = (None,) if accumulate else ()
    return NamedSharding(self.mesh, P(*lead, ("data", "fsdp"), *([None] * (ndim - 1))))

  def device_batch(self, local: dict[str, np.ndarray], accumulate: bool = True) -> dict[str, jax.Array]:
    """Process-local numpy batch [b, ...] -> global arrays; with accumulate, [A, B/A, ...] micro-batches."""
    out = {}
    for key, value in local.items():
      if key == "index":
        continue
      if accumulate:
        value = value.reshape(self.grad_accum, value.shape[0] // self.grad_accum, *value.shape[1:])
      sh = self.batch_sharding(value.ndim - int(accumulate), accumulate)
      out[key] = jax.make_array_from_process_local_data(sh, value)
    return out

  def train_step(self):
    """jit(step)(state, batch, extra) -> (state, metrics); state is donated."""
    grad_accum_step = _make_step(self.loss_fn, self.tx, self.lr_schedule, self.graphdef)
    replicated = NamedSharding(self.mesh, P())
    return jax.jit(grad_accum_step, donate_argnums=0, out_shardings=(self.state_shardings, replicated))

  def eval_step(self):
    """jit(fn)(params, batch, extra) -> (loss sum, count, metric sums) for one unaccumulated batch."""
    def fn(params, batch, extra):
      return self.loss_fn(nnx.merge(self.graphdef, params), batch, extra)
    return jax.jit(fn, out_shardings=NamedSharding(self.mesh, P()))


def build(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh) -> Trainer:
  if cfg.batch_size % cfg.grad_accum_steps:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by grad_accum_steps {cfg.grad_accum_steps}")
  micro = cfg.batch_size // cfg.grad_accum_steps
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if micro % dp:
    raise ValueError(f"micro-batch {micro} (batch_size {cfg.batch_size} / grad_accum_steps {cfg.grad_accum_steps})"
                     f" is not divisible by the data-parallel size data x fsdp = {dp}")
  if model_cfg.n_kv_heads % mesh.shape["tensor"]:
    raise ValueError(f"n_kv_heads {model_cfg.n_kv_heads} is not divisible by mesh tensor size {mesh.shape['tensor']}")
  tx = optim.make(cfg.optimizer, cfg.total_steps)
  abstract_model = model_lib.abstract(model_cfg)
  graphdef, abstract_vars = nnx.split(abstract_model, nnx.Param)
  abstract_params = nnx.to_pure_dict(abstract_vars)
  param_sh = sharding.param_shardings(abstract_vars, mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  state_sh = {
      "params": param_sh,
      "opt_state": _mirror_param_shardings(abstract_opt, abstract_params, param_sh, mesh),
      "step": NamedSharding(mesh, P()),
  }
  abstract_state = {"params": abstract_params, "opt_state": abstract_opt,
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}
  return Trainer(model_cfg, mesh, tx, optim.schedule(cfg.optimizer, cfg.total_steps), graphdef, abstract_state,
                 state_sh, make_loss_fn(cfg), cfg.grad_accum_steps)


def make_loss_fn(cfg: ml_collections.ConfigDict) -> LossFn:
  """(model, batch, extra) -> (loss sum, count, metric sums). extra: DPO reference log-probs [b, 2] or None."""
  if cfg.stage in ("pretrain", "sft"):
    return lambda model, batch, extra: losses.lm_loss(model, batch, cfg.optimizer.z_loss, cfg.loss_chunk)
  d = cfg.dpo
  return lambda model, batch, reference_logps: losses.dpo_loss(
      model, batch, reference_logps, beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
      dpo_weight=d.dpo_weight, sft_weight=d.sft_weight, chunk=cfg.loss_chunk)


def _mirror_param_shardings(abstract_opt, abstract_params, param_sh, mesh):
  """Optimizer subtrees shaped like the params (Adam moments) get the params' shardings; the rest replicated."""
  params_def = jax.tree.structure(abstract_params)
  is_params = lambda node: jax.tree.structure(node) == params_def
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda node: param_sh if is_params(node) else replicated, abstract_opt, is_leaf=is_params)


def _make_step(loss_fn: LossFn, tx, lr_schedule, graphdef):
  def step(state, batch, extra):
    params = state["params"]

    def micro(carry, xs):
      mb, mb_extra = xs
      def f(p):
        total, count, sums = loss_fn(nnx.merge(graphdef, p), mb, mb_extra)
        return total, (count, sums)
      (total, (count, sums)), grads = jax.value_and_grad(f, has_aux=True)(params)
      return jax.tree.map(jnp.add, carry, (grads, total, count, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    _, _, sums_shape = jax.eval_shape(
        lambda: loss_fn(nnx.merge(graphdef, params), jax.tree.map(lambda x: x[0], batch),
                        None if extra is None else extra[0]))
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grad_sum, total, count, sums), _ = jax.lax.scan(micro, init, (batch, extra))

    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    loss = total / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, state["opt_state"]),
                 "step": state["step"] + 1}
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state["step"]), "count": count,
               "finite": finite, **{k: v / denom for k, v in sums.items()}}
    return new_state, metrics

  return step
