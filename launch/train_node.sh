#!/usr/bin/env bash
USAGE="usage: launch/train_node.sh CONFIG.py:STAGE [--workdir DIR] [--config.FIELD=VALUE ...] [--dry_run]

Trains one stage on this node with all its GPUs (one process drives all local devices; the mesh in the config
spreads over them). Running it again resumes from the latest checkpoint. Exit 75: interrupted, resumable."
for d in "$(dirname "$0")" "${MIMIX_REPO:-}/launch" "${SLURM_SUBMIT_DIR:-}/launch"; do [ -f "$d/common.sh" ] && break; done
source "$d/common.sh" || { echo "cannot find launch/common.sh: run from the repository or set MIMIX_REPO" >&2; exit 2; }
[ ${#ARGS[@]} -ge 1 ] || { echo "$USAGE" >&2; exit 2; }
run "$PY" -m mimix_jax.train --config "${ARGS[@]}"
