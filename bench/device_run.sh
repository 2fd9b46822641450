#!/usr/bin/env bash
# On the lent GPU machine (after bench/prepare_device.sh here). Tables and logs go to $OUT (the device
# tool brings them back) or bench/results.
#   bench/device_run.sh all   # everything, most important first, inside DEVICE_BUDGET_S seconds (default
#                             # 540): a step that would not fit is skipped and named in the log, so one
#                             # call of the 15-minute lease brings back the targets' numbers first
#   bench/device_run.sh next  # what the last GPU session left open (docs/benchmarks.md §5g, §6)
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
  # BENCH_DEADLINE: interleaved benchmarks stop repeating before the timeout would stop them with nothing
  STEP_LABEL=$label BENCH_DEADLINE=$(( $(date +%s) + left - 20 )) timeout --signal=INT --kill-after=15 "$left" bash -c '"$@"' step "$@" || result="exit $?"  # (124: out of time)
  echo "== $label: $result after $((SECONDS - t0))s"
}
# shellcheck disable=SC2086  # DEVICE_ARGS: words
# (each step's JSON too: its tables and, where a script keeps them, every repeat's values)
bench() { mkdir -p "$OUTDIR/json"; python3 "bench/$1.py" $DEVICE_ARGS "${@:2}" --markdown "$MD" --json "$OUTDIR/json/${STEP_LABEL:-$1}.json"; }
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
      step checks 40 checks 1,2,4,5,6,7,8,9,10,13
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
    next)  # what session 12 (H100, docs/benchmarks.md §5g) left open, most needed first (§6 has the two calls).
           # Call 1 (DEVICE_BUDGET_S=570): the checks, then both sampling targets under inductor's CUDA graphs
           # with session 12's stacked per-run tensors (49 input copies per SD1.5 replay before, ~8 now), each step
           # split at its replays (session 13). Call 2 at once (SKIP naming what call 1 ran): the fixed profile,
           # the pinned features, the host's share alone (--compile host-only), then training and plain inductor.
           # (A 15-minute lease leaves the second call ~200 s after a cold start: session 12's were 500 + 273 s.)
      # (session 21: 3, 11 and 12 failed at 62 graphs / 27 breaks under torch 2.11, fixed since, §5h)
      # 11: the stacked keys and values replay right under CUDA graphs (another run's tensors: its eager images);
      # 3: plain inductor, one graph for two span lengths and two strengths; 12 (session 16): the one-kernel hybrid
      # site (fused_site.py, opt-in), compiled by Triton for the first time: the kernel against float64 at the real
      # site shapes in fp16 and bf16, sampling with it, and under CUDA graphs
      step checks 130 checks 3,11,12
      # session 12: +12.1 % +- 4.8 (12.0 -> 13.4 ms/step); 49 input copies per replay, 8 expected now. Its new
      # table splits the step at the replays (CUDA events): the adapter's extra inside the graph (its kernels)
      # against outside it (host, copies); the paired overhead's interval says whether 4 % is met (more repeats
      # than before for a tighter interval: ~0.6 s each after the compile, and BENCH_DEADLINE cuts them if need be).
      # Each variant is timed with both step clocks (session 15): synced is session 12's clock (the host waits for
      # the device every step, as with a preview), pipelined lets the host run ahead (no preview). Session 12's
      # profile had the device busy 7.3 ms of the 12.0 ms synced step: pipelined says what a step costs when the
      # host's work overlaps the device's. Session 16: hybrid with the three kernels per site (the product's
      # default) and with tau_q's GEMM then one kernel (fused-attention: half the three kernels' device time per
      # site under CUDA graphs in session 21's site-calls, where fused, tau_q inside the kernel, lost at every
      # shape), each paired with the same unpatched runs (21 repeats: three variants, two clocks)
      step sampling-reduce-overhead-sd15 240 bench sampling_overhead --models sd15 --modes clip --compile inductor --compile-mode reduce-overhead --no-real-flops --repeats 21 --site-kernel torch,fused-attention
      # the SDXL sampling target under inductor's CUDA graphs, never measured (two SDXL forward compiles; session
      # 12's two-variant SDXL run under the cudagraphs backend took 118 s in all; BENCH_DEADLINE cuts repeats)
      step sampling-reduce-overhead-sdxl 240 bench sampling_overhead --models sdxl --modes clip --compile inductor --compile-mode reduce-overhead --no-real-flops --repeats 11 --warmup 1
      # the SDXL target with the one-kernel site (session 16; 70 sites: ~1.6 GB of the adapter's bytes per step at
      # three kernels, §3j); a step of its own, as a third SDXL compile would not fit the target's step
      step sampling-reduce-overhead-sdxl-fused-attention 200 bench sampling_overhead --models sdxl --modes clip --compile inductor --compile-mode reduce-overhead --no-real-flops --repeats 11 --warmup 1 --site-kernel fused-attention
      # which kernels the adapter adds to the replay (device time per kernel, patched minus unpatched) and whose
      # Python its host time is (per function)
      step profile-reduce-overhead-sd15 130 bash -c "python3 bench/profile_sampling.py $DEVICE_ARGS --model sd15 --mode clip --compile inductor --compile-mode reduce-overhead > $OUTDIR/profile-reduce-overhead-sd15.txt"
      # a run's features from page-locked memory (staged, or kept pinned from Text Encode) against the product's
      # pageable copy (session 12: 3.2-9.0 ms per run, ~7 GB/s): what pinning would save per run
      step run-features 30 bench run_features
      # the step's host work alone, no U-Net kernel (session 13 on the CPU: the adapter adds 0.11 ms per SD1.5 step
      # to 0.87): this host's figure, SD1.5 and SDXL
      step sampling-host-only 100 bench sampling_overhead --modes clip --compile host-only --no-real-flops --repeats 9 --warmup 1 --step-clock synced
      # compiled training's step still waits on the host (SDXL: 181 ms of kernels in a 213 ms step, §5g): the
      # training step under CUDA graphs (train.py --compile-mode reduce-overhead; never run on a GPU: does it run
      # with the prefetch thread's side-stream copies, and how much faster?) against session 10's 147.6 img/s
      step training-reduce-overhead-sd15 170 train --models sd15 --no-floor --compile inductor --compile-mode reduce-overhead --warmup 5 --steps 10
      # the same with --unet-fp8 (session 19, §3u: the frozen U-Net's linear layers as float8 GEMMs), on the same
      # warm machine right after it: the A/B of what float8 GEMMs add to the fastest SD1.5 step
      step training-reduce-overhead-sd15-fp8 170 train --models sd15 --no-floor --compile inductor --compile-mode reduce-overhead --unet-fp8 --warmup 5 --steps 10
      # the same for SDXL, whose compiled step idles ~32 ms of 213 on the host (§5g): kernel launches that a replay
      # takes off the host; the way to the ~22 img/s its kernels allow (the compile: ~230 s in session 12)
      step training-reduce-overhead-sdxl 380 train --models sdxl --no-floor --compile inductor --compile-mode reduce-overhead --warmup 5 --steps 10
      # the new path's attention backend under CUDA graphs (session 13: sdpa_kernel traces into the one graph, so a
      # forced backend costs nothing per call there, unlike eager, §5e): if the split puts the overhead in the
      # replay, is torch's choice for the masked attention (64 keys, head dim 40) the fastest kernel, and what does
      # the mask cost (unmasked: a lower bound, wrong where tokens are masked)?
      step sampling-reduce-overhead-sd15-attend 240 bench sampling_overhead --models sd15 --modes clip --compile inductor --compile-mode reduce-overhead --no-real-flops --repeats 9 --attend efficient,cudnn,unmasked --step-clock pipelined
      # session 12: +12.3 % +- 2.4 with ~210 per-run inputs copied per replay (on top of every weight: §3n)
      step sampling-cudagraphs-sdxl 130 bench sampling_overhead --models sdxl --modes clip --compile cudagraphs --no-real-flops --repeats 7 --warmup 1 --step-clock synced
      # compiled SDXL training with every site's K/V projection compiled too (session 12, after its GPU run: the
      # compiled step waited ~32 ms on the host; the projections were ~560 eager ops per forward and their
      # backward), against 18.75 img/s, then the same-run A/B with them eager (the U-Net's graphs from the cache)
      step training-compiled-sdxl 330 train --models sdxl --no-floor --compile inductor --warmup 5 --steps 10
      step training-compiled-sdxl-eager-projections 200 train --models sdxl --no-floor --compile inductor --no-compile-projections --warmup 5 --steps 10
      # --unet-fp8 (session 19, never run on a GPU): the frozen U-Net's linear layers as float8 GEMMs (check 13 has
      # the per-GEMM speed-up). Compiled SDXL's GEMMs were 59 of its 181 ms of kernels (§5g): at twice the rate,
      # ~25 ms less per step. Against training-compiled-sdxl above, on the same machine
      step training-compiled-sdxl-fp8 330 train --models sdxl --no-floor --compile inductor --unet-fp8 --warmup 5 --steps 10
      # compiled SDXL training at batch 4 made 18.75 img/s (target 28; 181 ms of kernels per 213 ms step, GEMMs at
      # ~26 % of peak): batch 8 (the target names no batch size; ~60 GiB expected) for bigger GEMMs and half the
      # host work per image (its compile: ~230 s to the first step in session 12)
      step training-compiled-sdxl-b8 360 train --models sdxl --batch sdxl=8 --no-floor --compile inductor --warmup 4 --steps 8
      # compiled training reached 147.6 img/s (target 200) and the step is device-bound: do bigger GEMMs and
      # convolutions (batch 32) run nearer their peak? (the target names no batch size; the first SD1.5 training
      # step on a fresh machine also builds its feature cache, ~20 s)
      step training-compiled-sd15-b32 170 train --models sd15 --batch sd15=32 --no-floor --compile inductor --warmup 4 --steps 8
      # the whole bucket (one static graph, the default since session 9) against the span (a static graph, then a
      # dynamic one, which inductor on the CPU compiled wrongly): does CUDA run it, and faster per step?
      step training-compiled-span-sd15 130 train --models sd15 --no-floor --compile inductor --no-compile-whole-bucket --warmup 5 --steps 10
      # channels-last was slower eager (§5c); under inductor NHWC convolutions may win: against session 10's 147.6
      step training-compiled-channels-last-sd15 130 train --models sd15 --no-floor --compile inductor --channels-last --warmup 5 --steps 10
      step training-no-cudnn-benchmark 60 train --models sd15 --no-floor --steps 12 --warmup 3 --no-cudnn-benchmark
      # (session 16; measured in session 21 on an H200, §5h) a hybrid site per call at the real shapes, device time
      # of CUDA-graph replays: the three kernels against the one-kernel site and its tile shapes
      step site-calls 60 bench site_calls
      # plain inductor (session 10: +10.4 % +- 16), 15 repeats, and its kernel profile
      step sampling-compiled-sd15 150 bench sampling_overhead --models sd15 --modes clip --compile inductor --no-real-flops --repeats 15
      step profile-compiled-sd15 150 bash -c "python3 bench/profile_sampling.py $DEVICE_ARGS --model sd15 --mode clip --compile inductor > $OUTDIR/profile-compiled-sd15.txt"
      step sampling-compiled-sdxl 300 bench sampling_overhead --models sdxl --modes clip --compile inductor --no-real-flops --repeats 5 --warmup 1 ;;
    *) echo "usage: bench/device_run.sh all|next" >&2; exit 2 ;;
  esac
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)'
  run_part "$PART"
  echo "device_run.sh $PART: ${SECONDS}s"  # for planning the next session
} 2>&1 | tee "$LOG"
# the device tool brings back at most 8 files from $OUT: the steps' JSON files travel as one archive
if [ -n "${OUT:-}" ] && [ -d "$OUTDIR/json" ]; then
  (cd "$OUTDIR" && tar czf json.tgz json && rm -rf json)
fi
