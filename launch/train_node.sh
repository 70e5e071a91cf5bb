#!/usr/bin/env bash
USAGE="usage: launch/train_node.sh CONFIG.py:STAGE [--workdir DIR] [--config.FIELD=VALUE ...] [--dry_run]

Trains one stage on this node with all its GPUs (one process drives all local devices; the mesh in the config
spreads over them). Running it again resumes from the latest checkpoint."
source "$(dirname "$0")/common.sh"
[ ${#ARGS[@]} -ge 1 ] || { echo "$USAGE" >&2; exit 2; }
run "$PY" -m mimix_jax.train --config "${ARGS[@]}"
