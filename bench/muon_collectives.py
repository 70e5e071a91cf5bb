"""The collectives Muon adds to a sharded train step: counted in the compiled HLO on 8 virtual CPU devices.

    python bench/muon_collectives.py [--json FILE] [--meshes 1x8x1,2x2x2]

For each mesh (data x fsdp x tensor) and optimizer, compiles the real train step (bench_muon's model, batch 8 x
128) and counts all-gather / all-reduce / reduce-scatter / all-to-all / collective-permute ops and the bytes
they produce; then the same for the optimizer update alone (params, grads and state laid out as in training), so
that Muon's own share is seen without the forward and backward. One JSON line per mesh and optimizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_muon import MODEL  # noqa: E402

OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
# `%name = f32[2,64]{1,0} all-gather(...)` or a tuple result `(f32[..], f32[..]) all-reduce(...)`; -start/-done
# pairs of async collectives are counted once (at -start).
LINE = re.compile(r"=\s*(?P<shape>\(?[a-z0-9]+\[[^=]*?)\s+(?P<op>" + "|".join(OPS) + r")(?P<async>-start)?\(")


def count_collectives(hlo: str) -> dict:
  out = {op: {"count": 0, "bytes": 0} for op in OPS}
  for m in LINE.finditer(hlo):
    shapes = re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", m.group("shape"))
    nbytes = sum(DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in shapes)
    out[m.group("op")]["count"] += 1
    out[m.group("op")]["bytes"] += nbytes
  return out


def measure(mesh_shape: tuple[int, int, int], name: str) -> dict:
  import jax
  from mimix_jax.model import sharding
  from mimix_jax.training import config as config_lib, objectives
  from mimix_jax.training.step import TrainStep

  cfg = config_lib.defaults()
  cfg.model.update(**MODEL)
  cfg.update(max_len=128, batch_size=8, total_steps=100)
  cfg.optimizer.name = name
  mesh = sharding.make_mesh(*mesh_shape)
  step = TrainStep(cfg, objectives.from_config(cfg), mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), step.abstract_state,
                       step.state_shardings)
  with sharding.activate(mesh):
    train_hlo = step.lower(state, step.abstract_batch()).compile().as_text()
    update = jax.jit(step.tx.update, out_shardings=(step.state_shardings["params"], step.state_shardings["opt_state"]))
    update_hlo = update.lower(state["params"], state["opt_state"], state["params"]).compile().as_text()
  return {"mesh": "x".join(map(str, mesh_shape)), "optimizer": name, "train_step": count_collectives(train_hlo),
          "optimizer_update": count_collectives(update_hlo)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--meshes", default="1x8x1,2x2x2")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  rows = [measure(tuple(int(n) for n in mesh.split("x")), name) for mesh in args.meshes.split(",")
          for name in ("adamw", "muon")]
  for row in rows:
    print(json.dumps(row), flush=True)
  if args.json:
    Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
