#!/usr/bin/env bash
# On the lent GPU machine (after bench/prepare_device.sh here). Tables and logs go to $OUT (the device
# tool brings them back) or bench/results.
#   bench/device_run.sh all   # everything, most important first, inside DEVICE_BUDGET_S seconds (default
#                             # 540): a step that would not fit is skipped and named in the log, so one
#                             # call of the 15-minute lease brings back the targets' numbers first
#   bench/device_run.sh next  # what the last GPU session left open (docs/benchmarks.md §5f, §6)
# SKIP="label ..." leaves steps out (e.g. those a first call already measured); DEVICE_ARGS="--small"
# tries the script on a CPU (PATH must then start with the pinned venv's bin).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -d .bench/ComfyUI ] || { echo "no .bench/ComfyUI: run bench/prepare_device.sh first and carry .bench" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --target /tmp/llmdiff-site .bench/whl/*.whl || exit 2
export PYTHONPATH=/tmp/llmdiff-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LLMDIFF_COMFYUI_ROOT=$PWD/.bench/ComfyUI
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
PART=${1:-}
MD="$OUTDIR/tables-$PART.md"          # every benchmark table of this call
LOG="$OUTDIR/device-$PART.log"        # everything printed, and each step's seconds
DEADLINE=$((SECONDS + ${DEVICE_BUDGET_S:-540}))
KEEP=${TMPDIR:-/tmp}/llmdiff-bench-keep  # the training benches' dataset and feature cache, built once per model
export DEVICE_ARGS=${DEVICE_ARGS:-} MD LOG OUTDIR PART KEEP

step() {  # step <label> <seconds it needs at least> command...: run it if that much time is left, never past the deadline
  local label=$1 need=$2 left=$((DEADLINE - SECONDS)) t0=$SECONDS result=ok; shift 2
  [[ " ${SKIP:-} " == *" $label "* ]] && return 0
  if (( left < need )); then echo "== $label: SKIPPED (${left}s left, needs ~${need}s)"; return 0; fi
  echo "== $label"
  timeout --signal=INT --kill-after=15 "$left" bash -c '"$@"' step "$@" || result="exit $?"  # (124: out of time)
  echo "== $label: $result after $((SECONDS - t0))s"
}
# shellcheck disable=SC2086  # DEVICE_ARGS: words
bench() { python3 "bench/$1.py" $DEVICE_ARGS "${@:2}" --markdown "$MD"; }
checks() { python3 bench/gpu_checks.py --only "$1" --markdown "$OUTDIR/gpu-checks-$PART.md"; }
train() { bench training_throughput --keep "$KEEP" "$@"; }  # (the first step per model builds the cache)
export -f bench checks train

profiles() {
  step profile-sd15 30 bash -c "python3 bench/profile_sampling.py $DEVICE_ARGS --model sd15 --mode clip > $OUTDIR/profile-sd15-hybrid.txt"
  step profile-sdxl 40 bash -c "python3 bench/profile_sampling.py $DEVICE_ARGS --model sdxl --mode clip --steps 10 > $OUTDIR/profile-sdxl-hybrid.txt"
}

run_part() {
  case "$1" in
    all)  # the correctness checks, the four targets, then the diagnostics
      step checks 40 checks 1,2,4,5,6,7,8,9,10
      step sampling 90 bench sampling_overhead
      step encoding 40 bench score_encoding
      step training 90 train
      step workflow 60 bench workflow_memory
      step cache-reads 30 bench cache_reads --read-threads 1,2,4,8
      step encoder-span 20 bench encoder_span
      step run-features 20 bench run_features
      step attend-calls 40 bench attend_calls
      step sampling-fp32-adapter 60 bench sampling_overhead --modes clip,llm --adapter-dtype fp32 --no-real-flops
      profiles
      step checks-compile 100 checks 3,11
      step sampling-compiled 200 bench sampling_overhead --modes clip --compile inductor --no-real-flops
      step training-compiled 220 train --no-floor --compile inductor --warmup 5 --steps 10 ;;
    next)  # what session 10 (H100, docs/benchmarks.md §5f) left open, most needed first (§6 has the two calls).
           # Call 1 (DEVICE_BUDGET_S=520): the checks, then compiled SDXL training (never measured: its compile ran
           # past 244 s in session 7) with all the rest of the call. Call 2 at once (SKIP naming what call 1 ran,
           # ~320 s): SD1.5 sampling under CUDA graphs (inductor's reduce-overhead, then the cudagraphs backend), the
           # likely end of the launch-bound step's overhead, then SDXL under the cudagraphs backend
      # 10: its negative control was wrong on CUDA (draws at the cut width equal the bucket's); now other seeds.
      # 11 (new): the patched U-Net under inductor's CUDA graphs: no skip, and replays with another run's tensors
      # give that run's eager images
      step checks 100 checks 10,11
      # the SDXL training target compiled: its img/s against 28, the compile's phases and the profile of the step
      # (one compile: the whole bucket, the default; the first step on a fresh machine builds the feature cache)
      step training-compiled-sdxl 420 train --models sdxl --no-floor --compile inductor --warmup 5 --steps 10 --profile 2
      # eager sampling is launch-bound (the issue: 25-39 ms eager against 12 ms as a CUDA graph) and plain
      # inductor left the adapter's ~1.7-2.1 ms per step (§5f): CUDA graphs take the launches out, so what is left
      # is the adapter's kernels (the roofline's ~4 %). Inductor's reduce-overhead first: it keeps the weights as
      # static inputs. TorchCompileModel's own cudagraphs backend (no inductor: it compiles in about a minute, even
      # SDXL) treats every input as non-static on torch >= 2.5 (modules inlined: no parameter is "fixed"), so each
      # replay also copies the U-Net's weights into the graph's buffers: its baseline step is inflated (§3n)
      step sampling-reduce-overhead-sd15 150 bench sampling_overhead --models sd15 --modes clip --compile inductor --compile-mode reduce-overhead --no-real-flops --repeats 15
      # the adapter's kernels per step under CUDA graphs (patched minus unpatched): what is left of its cost there
      # (its compiles are in inductor's cache from the step above)
      step profile-reduce-overhead-sd15 100 bash -c "python3 bench/profile_sampling.py $DEVICE_ARGS --model sd15 --mode clip --compile inductor --compile-mode reduce-overhead > $OUTDIR/profile-reduce-overhead-sd15.txt"
      step sampling-cudagraphs-sd15 80 bench sampling_overhead --models sd15 --modes clip --compile cudagraphs --no-real-flops --repeats 15
      # a run's features moved once per run (step 1 extra was 30.9 ms compiled, §5f): joined on the host or the device
      step run-features 30 bench run_features
      # SDXL under CUDA graphs in about a minute of compiling (SDXL --small on this CPU: 85 s for the whole run)
      step sampling-cudagraphs-sdxl 130 bench sampling_overhead --models sdxl --modes clip --compile cudagraphs --no-real-flops --repeats 7 --warmup 1
      # plain inductor in the same session (session 10: +10.4 % ± 16), 15 repeats; the note says whether a graph
      # compiled while timing
      step sampling-compiled-sd15 150 bench sampling_overhead --models sd15 --modes clip --compile inductor --no-real-flops --repeats 15
      # what the compiled graph adds on the device per step, kernel by kernel (quick right after the step above:
      # its compiles are in inductor's cache)
      step profile-compiled-sd15 150 bash -c "python3 bench/profile_sampling.py $DEVICE_ARGS --model sd15 --mode clip --compile inductor > $OUTDIR/profile-compiled-sd15.txt"
      # the SDXL sampling target compiled (session 10 cut plain inductor off at 233 s, two SDXL U-Nets to compile):
      # with CUDA graphs first, then plain inductor
      step sampling-reduce-overhead-sdxl 460 bench sampling_overhead --models sdxl --modes clip --compile inductor --compile-mode reduce-overhead --no-real-flops --repeats 5 --warmup 1
      step sampling-compiled-sdxl 460 bench sampling_overhead --models sdxl --modes clip --compile inductor --no-real-flops --repeats 5 --warmup 1
      # compiled training reached 147.6 img/s (target 200) and the step is device-bound: do bigger GEMMs and
      # convolutions (batch 32) run nearer their peak? (the target names no batch size; the first SD1.5 training
      # step on a fresh machine also builds its feature cache, ~20 s)
      step training-compiled-sd15-b32 170 train --models sd15 --batch sd15=32 --no-floor --compile inductor --warmup 4 --steps 8
      # the whole bucket (one static graph, the default since session 9) against the span (a static graph, then a
      # dynamic one, which inductor on the CPU compiled wrongly): does CUDA run it, and faster per step?
      step training-compiled-span-sd15 130 train --models sd15 --no-floor --compile inductor --no-compile-whole-bucket --warmup 5 --steps 10
      # the eager SDXL step is partly host-bound (kernels 213 of 263 ms, §5f): the profile with the annotation fix
      step training-sdxl-profile 90 train --models sdxl --steps 6 --warmup 2 --profile 2
      # channels-last was slower eager (§5c); under inductor NHWC convolutions may win: against session 10's 147.6
      step training-compiled-channels-last-sd15 130 train --models sd15 --no-floor --compile inductor --channels-last --warmup 5 --steps 10
      step training-no-cudnn-benchmark 60 train --models sd15 --no-floor --steps 12 --warmup 3 --no-cudnn-benchmark ;;
    *) echo "usage: bench/device_run.sh all|next" >&2; exit 2 ;;
  esac
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)'
  run_part "$PART"
  echo "device_run.sh $PART: ${SECONDS}s"  # for planning the next session
} 2>&1 | tee "$LOG"
