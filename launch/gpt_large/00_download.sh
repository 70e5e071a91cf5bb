#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/00_download.sh [--dry_run]

Downloads the recipe's datasets (launch/gpt_large/sources.json: FineWeb sample-100BT for pretrain 1024;
FineWeb-Edu sample-10BT and English Wikipedia for pretrain 2048; four public SFT mixes; UltraFeedback binarized
(cleaned) for DPO) into RAW/NAME with python -m mimix_jax.download: only the training splits, resuming
interrupted files, skipping complete sources. MIRROR=DIR reads a local mirror laid out as the hub instead (the
rehearsal's). The original does not name its nine SFT sources; the list in sources.json is ours: edit it."
for d in "$(dirname "$0")" "${MIMIX_REPO:-}/launch/gpt_large" "${SLURM_SUBMIT_DIR:-}/launch/gpt_large"; do [ -f "$d/common.sh" ] && break; done
source "$d/common.sh" || { echo "cannot find launch/gpt_large/common.sh: run from the repository or set MIMIX_REPO" >&2; exit 2; }
run "$PY" -m mimix_jax.download --sources "$HERE/sources.json" --raw "$RAW" ${MIRROR:+--mirror "$MIRROR"}
