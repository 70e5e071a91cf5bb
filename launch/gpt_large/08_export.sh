#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/08_export.sh [--dry_run]

Exports the final model to Hugging Face format (bfloat16, verified against our logits) and the MimixLM layout."
source "$(dirname "$0")/common.sh"
run "$PY" -m mimix_jax.export --checkpoint "$RUNS/dpo" --output "$RUNS/export" --dtype bfloat16 --format mimixlm
