#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/07_ppl.sh [DATA...] [--dry_run]

Perplexity of the final (DPO) model on held-out text. Default: the shipped held-out books in data/corpus/eval
(public-domain literature none of the gpt_large stages trains on); pass your own files, directories or globs."
source "$(dirname "$0")/common.sh"
[ ${#ARGS[@]} -gt 0 ] || ARGS=(data/corpus/eval)
run "$PY" -m mimix_jax.evaluate --checkpoint "$RUNS/dpo" --data "${ARGS[@]}" --batch_size 64 --output "$RUNS/dpo/ppl.json"
