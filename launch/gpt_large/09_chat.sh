#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/09_chat.sh [--dry_run]

Chats with the final model (streaming, KV-cached history; /help inside)."
source "$(dirname "$0")/common.sh"
run "$PY" -m mimix_jax.chat --checkpoint "$RUNS/dpo"
