#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/08_export.sh [--dry_run]

Exports the final model to Hugging Face format (bfloat16, verified against our logits) and the MimixLM layout,
into RUNS/export. Skipped when the export is complete (export.json is written last, after verification)."
for d in "$(dirname "$0")" "${MIMIX_REPO:-}/launch/gpt_large" "${SLURM_SUBMIT_DIR:-}/launch/gpt_large"; do [ -f "$d/common.sh" ] && break; done
source "$d/common.sh" || { echo "cannot find launch/gpt_large/common.sh: run from the repository or set MIMIX_REPO" >&2; exit 2; }
done_already "$RUNS/export/export.json" export && exit 0
run "$PY" -m mimix_jax.export --checkpoint "$RUNS/dpo" --output "$RUNS/export" --dtype bfloat16 --format mimixlm
