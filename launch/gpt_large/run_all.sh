#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/run_all.sh [--root DIR] [--rehearse] [--dry_run]

The whole gpt_large recipe in order: download, tokenizer, preprocess, pretrain, pretrain_2048, sft, dpo, ppl,
export, one chat reply. Every step skips what is complete and resumes what is not, so after an interruption
(or a kill) run the same command again: it finishes the chain, redoing only the unfinished step. A step that
fails stops the chain (a train step interrupted by a signal exits 75: resumable).

--root DIR     raw data, shards and runs under DIR (default: the repository's data/gpt_large and runs/gpt_large)
--rehearse     the same scripts at CPU size (configs/gpt_large_rehearsal.py, a 1024-id tokenizer, sequences of
               64 and 128) on a local mirror of the datasets made from the shipped data (DIR/mirror): minutes on
               2 cores. Run it before renting GPUs. Needs --root."
for d in "$(dirname "$0")" "${MIMIX_REPO:-}/launch/gpt_large" "${SLURM_SUBMIT_DIR:-}/launch/gpt_large"; do [ -f "$d/common.sh" ] && break; done
source "$d/../common.sh" || { echo "cannot find launch/common.sh: run from the repository or set MIMIX_REPO" >&2; exit 2; }
here=$(cd "$d" && pwd)
set -- ${ARGS[@]+"${ARGS[@]}"}
REHEARSE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) export GPT_LARGE_ROOT=$2; shift 2 ;;
    --root=*) export GPT_LARGE_ROOT=${1#--root=}; shift ;;
    --rehearse) REHEARSE=1; shift ;;
    *) echo "run_all.sh: unknown argument $1" >&2; echo "$USAGE" >&2; exit 2 ;;
  esac
done
flag=(); [ "$DRY_RUN" = 1 ] && flag=(--dry_run)
if [ "$REHEARSE" = 1 ]; then
  [ -n "${GPT_LARGE_ROOT:-}" ] || { echo "run_all.sh: --rehearse needs --root DIR" >&2; exit 2; }
  export CONFIG=$REPO/configs/gpt_large_rehearsal.py VOCAB=1024 SEQ_SHORT=64 SEQ_LONG=128 WORKERS=${WORKERS:-2}
  export MIRROR=$GPT_LARGE_ROOT/mirror
  run "$PY" "$here/make_mirror.py" --output "$MIRROR"
fi
start=$SECONDS
for step in 00_download 01_tokenizer 02_preprocess 03_pretrain 04_pretrain_2048 05_sft 06_dpo 07_ppl 08_export; do
  echo "=== $step"
  bash "$here/$step.sh" ${flag[@]+"${flag[@]}"}
done
source "$here/common.sh"
echo "=== one chat reply"
# A CPU-size model's greedy reply can be one piece repeated; the original's repetition penalty keeps it to words.
run "$PY" -m mimix_jax.generate --checkpoint "$RUNS/dpo" --chat --greedy --repetition_penalty 1.2 \
  --max_new_tokens 40 --prompt "What is AI?"
echo "recipe complete in $((SECONDS - start)) s; chat with: launch/gpt_large/09_chat.sh (same environment)"
