#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/04_pretrain_2048.sh [--config.FIELD=VALUE ...] [--dry_run]

Stage 'pretrain_2048' of configs/gpt_large.py on one 8-GPU node (or N nodes: sbatch --nodes=N --ntasks-per-node=1 --gpus-per-node=8 launch/gpt_large/04_pretrain_2048.sh).
Writes runs/gpt_large/pretrain_2048; running it again resumes."
source "$(dirname "$0")/common.sh"
train_stage pretrain_2048 ${ARGS[@]+"${ARGS[@]}"}
