#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one command: trunk frames/s, memory attention teacher vs
# student, and the seed config's train step at 1, 2 and 4 clips per device with the remat settings
# that fit, each with its MFU (about 8 minutes on one H200), then the tracking loop end to end
# (`es3 bench track`; up to 10 minutes per framework, not yet measured on a GPU).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]    # JSON-lines records in OUT_DIR (default: gpu_results/)
#
# Each benchmark writes its own file, so a benchmark that fails (e.g. out of memory) leaves the
# others' records; the script's exit code is the number of benchmarks that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_results}
mkdir -p "$OUT"
ES3=${ES3:-es3}
# Let JAX use most of the device: the plan's fits columns assume this share of its memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
failed=0

bench() {  # bench RECORD_NAME BENCHMARK [ARGS... [KEY VALUE...]]
  local name=$1 benchmark=$2
  shift 2
  echo "== $name: $ES3 bench $benchmark $*" >&2
  # --json and --output go first: trailing KEY VALUE overrides take the rest of the line.
  if ! timeout "${TIMEOUT:-300}" "$ES3" bench "$benchmark" --json --output "$OUT/$name.jsonl" "$@"; then
    echo "!! $name failed" >&2
    failed=$((failed + 1))
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1 || true

bench trunks embed --frameworks jax,torch --batch_size 1,8 --repeats 5 MODEL.COMPUTE_DTYPE bfloat16
bench memory_attention memory-attention --configs teacher efficient_memory --batch 1 8 \
  --frameworks jax --repeats 10
# The default launch (TRAIN.REMAT frame at 4 clips per device), and what remat costs beside it.
for case in "1 none" "2 none" "4 none" "4 frame"; do
  read -r clips remat <<< "$case"
  bench "train_distill_b${clips}_${remat}" train --config efficient_memory --modes distill \
    --warmup 2 --repeats 5 TRAIN.BATCH_SIZE "$clips" TRAIN.REMAT "$remat" MODEL.COMPUTE_DTYPE bfloat16
done
bench plan_gpu plan --devices 0 --modes distill --batch_sizes 4 --remat none frame \
  --dtypes bfloat16 --gpu H200
# The same plans compiled deviceless from the H200's description (what CI and a laptop compute),
# to compare with the device's own above.
TIMEOUT=900 bench plan_deviceless plan --target h200 --devices 1 --modes distill --batch_sizes 4 \
  --remat none frame --dtypes bfloat16
# The whole tracking loop at SAM3's size (1008 px, 32-block ViT), 32 frames. One framework per
# process: JAX takes most of the device (XLA_PYTHON_CLIENT_MEM_FRACTION above), leaving PyTorch none.
TIMEOUT=600 bench track_jax track --config configs/efficient_memory.yaml --frameworks jax \
  --objects 1 8 32 128 --objects_per_batch 32 MODEL.COMPUTE_DTYPE bfloat16
TIMEOUT=600 bench track_pytorch track --config configs/efficient_memory.yaml --frameworks pytorch \
  --objects 1 8 32

exit "$failed"
