#!/usr/bin/env bash
# The prepared GPU benchmark: one call on a lent H100/H200 (about 8 minutes), from the repo root:
#   bash bench/fetch_gpu_wheels.sh            # here, once: Python 3.12 wheels the GPU image lacks -> .whl/
#   device run: carry [".whl"], command "bash bench/gpu.sh", timeout_s 560
# Prints versions and the device, then the gpt_large train step at seq 1024 (largest batch that fits, fused
# attention on and off, two remat policies: tokens/s, MFU, peak memory), decode speed of the large model and the
# stall of an asynchronous checkpoint.
# Results: JSON lines in $OUT/gpu.jsonl (or bench/results/gpu.jsonl).
# GPU_BENCH_SHAPE, GPU_BENCH_BATCHES, GPU_BENCH_PRESET: a rehearsal at toy size on a CPU (tests/test_bench.py).
set -uo pipefail
cd "$(dirname "$0")/.."
SHAPE=${GPU_BENCH_SHAPE:-gpu_large} BATCHES=${GPU_BENCH_BATCHES:-32 24 16 8} PRESET=${GPU_BENCH_PRESET:-large}
# The carried wheels are built for the GPU image's Python 3.12.
if compgen -G ".whl/*.whl" > /dev/null && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
RESULTS=${OUT:-bench/results}/gpu.jsonl
mkdir -p "$(dirname "$RESULTS")"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python3 -c "import sys, jax, flax, optax, grain, orbax.checkpoint as ocp; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', ocp.__version__, 'grain', grain.__version__); print(jax.devices())" || exit 1
git rev-parse --short HEAD 2>/dev/null || true
for remat in save_dots full; do
  for attention in cudnn xla; do
    for batch in $BATCHES; do  # per GPU, seq 1024: the first that fits
      timeout 170 python3 bench/train_throughput.py --shape "$SHAPE" --batch "$batch" --attention "$attention" \
        --remat "$remat" --loss_chunk 256 --steps 5 --rounds 2 --no-torch --json "$RESULTS" && break
      echo "batch $batch failed ($attention, $remat)"
    done
  done
done
timeout 150 python3 bench/bench_decode.py --presets "$PRESET" --batches 1 8 --repeats 3 --hf_threads 1 || echo "decode bench failed"
# Last, so that it only spends what is left: an async save of the 4 GiB train state next to a blocking one.
timeout 100 python3 bench/bench_checkpoint.py --shape "$SHAPE" --saves 1 --window 2 --json "$RESULTS" || echo "checkpoint bench failed"
