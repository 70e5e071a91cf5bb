#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/09_chat.sh [--dry_run]

Chats with the final model (streaming, KV-cached history; /help inside)."
for d in "$(dirname "$0")" "${MIMIX_REPO:-}/launch/gpt_large" "${SLURM_SUBMIT_DIR:-}/launch/gpt_large"; do [ -f "$d/common.sh" ] && break; done
source "$d/common.sh" || { echo "cannot find launch/gpt_large/common.sh: run from the repository or set MIMIX_REPO" >&2; exit 2; }
run "$PY" -m mimix_jax.chat --checkpoint "$RUNS/dpo"
