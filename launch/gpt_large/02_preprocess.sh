#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/02_preprocess.sh [--dry_run]

Tokenizes and packs every stage's data: pretrain 1024 (FineWeb), pretrain 2048 (FineWeb-Edu + Wikipedia),
SFT (all sources merged into one conversation format, packed), DPO (UltraFeedback)."
source "$(dirname "$0")/common.sh"
P=("$PY" -m mimix_jax.preprocess --tokenizer "$TOKENIZER" --workers "$WORKERS")
run "${P[@]}" --stage pretrain --input "$RAW/fineweb/sample/100BT" --text_field text --max_len 1024 --output "$DATA/pretrain_1024"
run "${P[@]}" --stage pretrain --input "$RAW/fineweb_edu/sample/10BT" "$RAW/wikipedia/20231101.en" --text_field text \
  --max_len 2048 --output "$DATA/pretrain_2048"
run "${P[@]}" --stage sft --input "$RAW/sft" --max_len 2048 --pack --output "$DATA/sft"
run "${P[@]}" --stage dpo --input "$RAW/ultrafeedback" --max_len 2048 --output "$DATA/dpo"
