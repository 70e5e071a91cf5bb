#!/usr/bin/env bash
USAGE="usage: launch/chat.sh RUN_OR_STEP_DIR [--system TEXT] [--chat | --raw] [--temperature T --top_p P ...] [--dry_run]

Chats with a trained run in the terminal (python -m mimix_jax.chat): streaming replies, history kept in the KV
cache, /help for the commands. Raw continuation for pretrained-only runs is chosen from the run (--chat forces chat)."
[ $# -ge 1 ] && [ -e "$1" ] && set -- "$(cd "$1" && pwd)" "${@:2}"  # common.sh moves to the repo root
source "$(dirname "$0")/common.sh"
[ ${#ARGS[@]} -ge 1 ] || { echo "$USAGE" >&2; exit 2; }
run "$PY" -m mimix_jax.chat --checkpoint "${ARGS[@]}"
