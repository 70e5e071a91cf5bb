#!/usr/bin/env bash
USAGE="usage: launch/chat.sh RUN_OR_STEP_DIR [--system TEXT] [--chat | --raw] [--temperature T --top_p P ...] [--dry_run]

Chats with a trained run in the terminal (python -m mimix_jax.chat): streaming replies, history kept in the KV
cache, /help for the commands. Raw continuation for pretrained-only runs is chosen from the run (--chat forces chat)."
for d in "$(dirname "$0")" "${MIMIX_REPO:-}/launch" "${SLURM_SUBMIT_DIR:-}/launch"; do [ -f "$d/common.sh" ] && break; done
source "$d/common.sh" || { echo "cannot find launch/common.sh: run from the repository or set MIMIX_REPO" >&2; exit 2; }
[ ${#ARGS[@]} -ge 1 ] || { echo "$USAGE" >&2; exit 2; }
run "$PY" -m mimix_jax.chat --checkpoint "${ARGS[@]}"
