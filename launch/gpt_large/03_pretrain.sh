#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/03_pretrain.sh [--config.FIELD=VALUE ...] [--dry_run]

Stage 'pretrain' of CONFIG (configs/gpt_large.py) on one 8-GPU node (or N nodes: sbatch --nodes=N
--ntasks-per-node=1 --gpus-per-node=8 launch/gpt_large/03_pretrain.sh, from the repository). Writes RUNS/pretrain; running it
again resumes, and does nothing once the stage is complete. Exit 75: interrupted, resumable."
for d in "$(dirname "$0")" "${MIMIX_REPO:-}/launch/gpt_large" "${SLURM_SUBMIT_DIR:-}/launch/gpt_large"; do [ -f "$d/common.sh" ] && break; done
source "$d/common.sh" || { echo "cannot find launch/gpt_large/common.sh: run from the repository or set MIMIX_REPO" >&2; exit 2; }
train_stage pretrain ${ARGS[@]+"${ARGS[@]}"}
