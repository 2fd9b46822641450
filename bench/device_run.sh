#!/usr/bin/env bash
# On the lent GPU machine (after bench/prepare_device.sh here): one part of bench/run_all.sh per call,
# so each call stays well inside the device tool's 10-minute limit. Tables go to $OUT (the tool brings
# them back) or bench/results.
#   bench/device_run.sh 1   # GPU correctness checks (bench/gpu_checks.py, all but compile), then sampling
#                           # overhead (fp16-projection and fp32 adapters) + score encoding
#   bench/device_run.sh 2   # training throughput + workflow memory + the two sampling profiles
#   bench/device_run.sh 3   # optional: the compile check, sampling under torch.compile, training with
#                           # channels-last + compile
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -d .bench/ComfyUI ] || { echo "no .bench/ComfyUI: run bench/prepare_device.sh first and carry .bench" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --target /tmp/llmdiff-site .bench/whl/*.whl
export PYTHONPATH=/tmp/llmdiff-site${PYTHONPATH:+:$PYTHONPATH}
export LLMDIFF_COMFYUI_ROOT=$PWD/.bench/ComfyUI LLMDIFF_PYTHON=python3 BENCH_JSON=0
export BENCH_OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
case "${1:-}" in
  1) export BENCH_ONLY="sampling_overhead score_encoding" ;;
  2) export BENCH_ONLY="training_throughput workflow_memory profile_sampling" ;;
  3) export BENCH_ONLY="sampling-compiled training-fast" ;;
  *) echo "usage: bench/device_run.sh 1|2|3" >&2; exit 2 ;;
esac
checks() {  # the correctness table goes next to the benchmark tables; a failed check is reported, not fatal
  python3 bench/gpu_checks.py --only "$1" --markdown "$BENCH_OUT/gpu-checks-part-$2.md" 2>&1 \
    | tee "$BENCH_OUT/gpu-checks-part-$2.log" || echo "gpu_checks: a check FAILED (see the table)" >&2
}
case "$1" in
  1) checks 1,2,4,5,6,7 1 ;;
  3) checks 3 3 ;;
esac
bench/run_all.sh 2>&1 | tee "$BENCH_OUT/device-part-$1.log"
echo "device_run.sh $1: ${SECONDS}s" | tee -a "$BENCH_OUT/device-part-$1.log"  # for planning the next session
