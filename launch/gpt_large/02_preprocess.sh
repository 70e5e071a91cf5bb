#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/02_preprocess.sh [--dry_run]

Tokenizes and packs every stage's data: pretrain SEQ_SHORT (1024: FineWeb), pretrain SEQ_LONG (2048: FineWeb-Edu
+ Wikipedia), SFT (all sources merged into one conversation format, packed), DPO (UltraFeedback). Each output
that is complete (its manifest is written last) is skipped."
for d in "$(dirname "$0")" "${MIMIX_REPO:-}/launch/gpt_large" "${SLURM_SUBMIT_DIR:-}/launch/gpt_large"; do [ -f "$d/common.sh" ] && break; done
source "$d/common.sh" || { echo "cannot find launch/gpt_large/common.sh: run from the repository or set MIMIX_REPO" >&2; exit 2; }
prep() {  # prep OUTPUT ARGS...
  local out=$1; shift
  done_already "$out/manifest.json" "$(basename "$out")" && return 0
  run "$PY" -m mimix_jax.preprocess --tokenizer "$TOKENIZER" --workers "$WORKERS" --output "$out" "$@"
}
prep "$DATA/pretrain_1024" --stage pretrain --input "$RAW/fineweb" --text_field text --max_len "$SEQ_SHORT"
prep "$DATA/pretrain_2048" --stage pretrain --input "$RAW/fineweb_edu" "$RAW/wikipedia" --text_field text \
  --max_len "$SEQ_LONG"
prep "$DATA/sft" --stage sft --input "$RAW/sft" --max_len "$SEQ_LONG" --pack
prep "$DATA/dpo" --stage dpo --input "$RAW/ultrafeedback" --max_len "$SEQ_LONG"
