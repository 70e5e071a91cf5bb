#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/run_all.sh [--dry_run]

The whole gpt_large recipe in order: download, tokenizer, preprocess, pretrain, pretrain_2048, sft, dpo, ppl,
export. Every step resumes or skips what is done, so re-running after an interruption continues."
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
flag=(); [ "$DRY_RUN" = 1 ] && flag=(--dry_run)
for step in 00_download 01_tokenizer 02_preprocess 03_pretrain 04_pretrain_2048 05_sft 06_dpo 07_ppl 08_export; do
  echo "=== $step"
  bash "$here/$step.sh" ${flag[@]+"${flag[@]}"}
done
echo "chat with: launch/gpt_large/09_chat.sh"
