#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/07_ppl.sh [DATA...] [--dry_run]

Perplexity of the final (DPO) model on held-out text. Default: the shipped held-out books in data/corpus/eval
(public-domain literature none of the gpt_large stages trains on); pass your own files, directories or globs.
Skipped when RUNS/dpo/ppl.json exists."
for d in "$(dirname "$0")" "${MIMIX_REPO:-}/launch/gpt_large" "${SLURM_SUBMIT_DIR:-}/launch/gpt_large"; do [ -f "$d/common.sh" ] && break; done
source "$d/common.sh" || { echo "cannot find launch/gpt_large/common.sh: run from the repository or set MIMIX_REPO" >&2; exit 2; }
done_already "$RUNS/dpo/ppl.json" perplexity && exit 0
[ ${#ARGS[@]} -gt 0 ] || ARGS=("$REPO/data/corpus/eval")
run "$PY" -m mimix_jax.evaluate --checkpoint "$RUNS/dpo" --data "${ARGS[@]}" --batch_size 64 --output "$RUNS/dpo/ppl.json"
