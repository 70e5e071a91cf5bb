#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/05_sft.sh [--config.FIELD=VALUE ...] [--dry_run]

Stage 'sft' of configs/gpt_large.py on one 8-GPU node (or N nodes: sbatch --nodes=N --ntasks-per-node=1 --gpus-per-node=8 launch/gpt_large/05_sft.sh).
Writes runs/gpt_large/sft; running it again resumes."
source "$(dirname "$0")/common.sh"
train_stage sft ${ARGS[@]+"${ARGS[@]}"}
