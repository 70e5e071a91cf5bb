#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/00_download.sh [--dry_run]

Downloads the reference recipe's data with huggingface-cli into data/gpt_large/raw/ (skips what is there):
  FineWeb sample-100BT (pretrain 1024), FineWeb-Edu sample-10BT + English Wikipedia (pretrain 2048),
  the SFT sources in \$SFT_DATASETS, UltraFeedback binarized (cleaned) for DPO.
The reference's nine SFT sources are not named in its code; the default list below is ours (all in schemas that
preprocess --stage sft reads). Override: SFT_DATASETS='org/a org/b' launch/gpt_large/00_download.sh"
source "$(dirname "$0")/common.sh"
SFT_DATASETS=${SFT_DATASETS:-"HuggingFaceH4/ultrachat_200k teknium/OpenHermes-2.5 Open-Orca/SlimOrca allenai/tulu-v2-sft-mixture"}
fetch() {  # fetch REPO DEST [--include PATTERN]
  local repo=$1 dest=$2; shift 2
  if [ -d "$dest" ] && [ -n "$(ls -A "$dest" 2>/dev/null)" ]; then echo "have $dest"; return; fi
  run huggingface-cli download "$repo" --repo-type dataset --local-dir "$dest" "$@"
}
fetch HuggingFaceFW/fineweb "$RAW/fineweb" --include "sample/100BT/*"
fetch HuggingFaceFW/fineweb-edu "$RAW/fineweb_edu" --include "sample/10BT/*"
fetch wikimedia/wikipedia "$RAW/wikipedia" --include "20231101.en/*"
for ds in $SFT_DATASETS; do fetch "$ds" "$RAW/sft/${ds//\//__}" --include "*.parquet" --include "*.jsonl*" --include "*.json"; done
fetch argilla/ultrafeedback-binarized-preferences-cleaned "$RAW/ultrafeedback"
