"""Train one stage (pretrain / SFT / DPO): `python -m mimix_jax.train --config FILE.py:STAGE --workdir RUN_DIR`.

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
from pathlib import Path

from mimix_jax.training import checkpoints, config as config_lib, distributed, loop, run_dir


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
  """Exit codes: 0 the stage reached total_steps; 2 a user error (one line: the field or file and the fix);
  loop.EXIT_INTERRUPTED (75) stopped by a signal, saved and resumable; loop.EXIT_NONFINITE (3) halted on
  non-finite steps; loop.EXIT_SAVE_FAILED (74) a checkpoint could not be written."""
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  file, _, stage = args.config.partition(":")
  workdir = Path(args.workdir or Path("runs") / Path(file).stem / (stage or "default"))
  try:
    cfg = config_lib.load(args.config, overrides)
    config_lib.validate(cfg)
    if args.dry_run:
      from mimix_jax.training import planner
      if cfg.model.vocab_size == 0:  # the tokenizer's: it must exist to plan
        loop.resolve_vocabulary(cfg)
      planner.report(cfg)
      return 0
    distributed.initialize(args)
    prepared = loop.prepare(cfg, workdir)
  except (KeyError, ValueError, FileNotFoundError) as e:
    return _fail(e, 2)
  try:
    return loop.run(prepared, command=" ".join(sys.argv))
  except (run_dir.RunInUse, checkpoints.DamagedCheckpoint) as e:
    return _fail(e, 2)
  except loop.TrainError as e:
    return _fail(e, e.exit_code)


def _fail(e: BaseException, code: int) -> int:
  print(f"train: error: {e.args[0] if e.args else e}", file=sys.stderr, flush=True)
  return code


if __name__ == "__main__":
  sys.exit(main())
