#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/01_tokenizer.sh [--dry_run]

Trains the 50256-id BPE tokenizer (50000 merges' worth plus the special tokens) on a seeded sample of FineWeb."
source "$(dirname "$0")/common.sh"
run "$PY" -m mimix_jax.tokenizer --input "$RAW/fineweb/sample/100BT" --text_field text --vocab_size 50256 \
  --max_sentences 20000000 --max_chars 2000000000 --seed 0 --output "$TOKENIZER"
