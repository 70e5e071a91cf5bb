#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/01_tokenizer.sh [--dry_run]

Trains the VOCAB-id (50256) BPE tokenizer on a seeded sample of FineWeb. Skipped when the tokenizer exists."
for d in "$(dirname "$0")" "${MIMIX_REPO:-}/launch/gpt_large" "${SLURM_SUBMIT_DIR:-}/launch/gpt_large"; do [ -f "$d/common.sh" ] && break; done
source "$d/common.sh" || { echo "cannot find launch/gpt_large/common.sh: run from the repository or set MIMIX_REPO" >&2; exit 2; }
done_already "$TOKENIZER/tokenizer_config.json" tokenizer && exit 0
run "$PY" -m mimix_jax.tokenizer --input "$RAW/fineweb" --text_field text --vocab_size "$VOCAB" \
  --max_sentences 20000000 --max_chars 2000000000 --seed 0 --output "$TOKENIZER"
