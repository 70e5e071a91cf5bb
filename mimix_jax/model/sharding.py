"""Logical axis names -> mesh axes.

The model names every parameter and activation dimension with a logical axis ("embed", "mlp", ...).
A rule table maps each logical name onto zero or more of the mesh axes `data`, `fsdp`, `tensor`.
Changing the table (or the mesh shape) switches between data parallel, FSDP, tensor parallel and their
combinations without touching the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),  # activations: batch split over every data-parallel axis
    ("vocab", "tensor"),
    ("embed", "fsdp"),  # FSDP: weights sharded along d_model
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("length", None),
    ("act_embed", None),  # activations keep d_model whole
)

_ACTIVE_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("mimix_rules", default=None)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 to take the rest.

  jax.make_mesh orders the devices by the physical topology (neighbours on the fastest links share the inner
  axes); axes are Auto, so shardings propagate from the constraints.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  shown = ", ".join(f"mesh.{name}={size}" for name, size in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{shown}: each size must be >= 1, and at most one may be -1 (the remaining devices)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{shown} does not divide the {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"{shown} needs {math.prod(sizes)} devices, found {len(devices)}")
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES) -> P:
  table = dict(rules)
  spec = []
  for name in axes:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f"no sharding rule for logical axis {name!r}")
    spec.append(table[name])
  return P(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
  """NamedShardings (a pure dict like the params) for a State whose Params carry `logical_axes` metadata."""

  def one(v):
    spec = logical_to_spec(v.logical_axes, rules)
    _check_divisible(v.get_value().shape, spec, mesh, v.logical_axes)
    return NamedSharding(mesh, spec)

  return nnx.to_pure_dict(jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _check_divisible(shape, spec: P, mesh: Mesh, axes) -> None:
  for dim, mesh_axes in zip(shape, spec):
    if mesh_axes is None:
      continue
    names = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
    n = math.prod(mesh.shape[a] for a in names)
    if dim % n:
      raise ValueError(f"parameter dim {dim} (logical axes {axes}) is not divisible by mesh axes {names} of size {n}")


def batch_sharding(mesh: Mesh, ndim: int = 2, accumulate: bool = False) -> NamedSharding:
  """Batch arrays [B, ...] (with accumulate, micro-batches [A, B/A, ...]): B over data x fsdp, the rest replicated."""
  lead = (None,) if accumulate else ()
  return NamedSharding(mesh, P(*lead, ("data", "fsdp"), *([None] * (ndim - 1 - len(lead)))))


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
  """Makes `constrain` active while tracing under this mesh."""
  token = _ACTIVE_RULES.set(tuple(rules))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
  """Sharding constraint on an activation by logical axes; a no-op outside `activate`."""
  rules = _ACTIVE_RULES.get()
  if rules is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))
