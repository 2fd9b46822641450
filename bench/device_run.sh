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
    next)  # what session 28 (H200, docs/benchmarks.md §5j) left open, most needed first (§6 has the two calls).
           # Call 1 (DEVICE_BUDGET_S=555): SD1.5 training under CUDA graphs with two batches prepared side by side,
           # then the SDXL sampling target with fused-attention. Call 2 at once (SKIP naming what call 1 ran; the
           # machine stays warm 30 s): check 12 again, the prefetch A/B, then what is left, in this order.
           # (Session 28 on an H200: a cold start ~48 s; checks 12 and 14 201 s; SD1.5 training under
           # reduce-overhead 169 s from a cold cache; SDXL with three variants ran past 330 s, nothing measured.)
      # session 28: 161.6 img/s under CUDA graphs with one prefetch thread, whose 86 ms a batch was longer than the
      # step's 77 ms of compute (data wait 22 ms): now two batches are prepared side by side (--prefetch-batches 2,
      # the default). At 77 ms a step, 208 img/s: the 200 target
      step training-reduce-overhead-sd15 170 train --models sd15 --no-floor --compile inductor --compile-mode reduce-overhead --warmup 5 --steps 10
      # session 23: SDXL +5.37 % [4.81 .. 6.22] with the three kernels (target 6 %: the interval's top is above);
      # SD1.5's fused-attention took 0.11 ms of the 0.37 ms its sites cost inside the replay (+4.05 % against
      # +5.49 %). SDXL with fused-attention only (auto's pick here; two compiles: unpatched and patched; session 28's
      # three did not finish in 330 s)
      step sampling-reduce-overhead-sdxl 330 bench sampling_overhead --models sdxl --modes clip --compile inductor --compile-mode reduce-overhead --no-real-flops --repeats 11 --warmup 1 --site-kernel fused-attention
      # 12: the kernel, sampling, the default (auto must run fused-attention under inductor's CUDA graphs) and
      # fused-attention under the cudagraphs backend: session 28's run failed there (a dynamic key length replayed
      # the first prompt's recording, fixed: attention.key_length_for_run; now a graph per span length)
      # 6: training from the cache with batches copied on the side stream: since session 29 (§3x) no copy from a
      # prefetch thread may block (a pageable tensor's copy synchronised the side stream); equal losses (~15 s)
      step checks 230 checks 6,12
      # the prefetch A/B: one thread, as session 28 ran it (the U-Net's graphs from the compile cache)
      step training-reduce-overhead-sd15-prefetch1 130 train --models sd15 --no-floor --compile inductor --compile-mode reduce-overhead --prefetch-batches 1 --warmup 5 --steps 10
      # the data path alone on this host's 16 cores: read threads, and batches prepared side by side (2 cores, session
      # 28: 1.23x the pace at 2 batches against 1)
      step cache-reads 30 bench cache_reads --read-threads 1,4,8 --prefetch-batches 1,2,3
      # the site kernel's tiles at spans of 64 and 256 keys: session 24's (fewer rows a program at long spans, no
      # register spill on sm_90; 128/8 for heads up to 64 wide, session 21's -9 % at SDXL's sites) against the old
      # ones (64/8; 32/4 for 80-wide heads). And session 23's profile has tau_q's GEMMs at 0.104 of SD1.5's 0.37 ms
      # inside the replay: a site's to_q and tau_q read the same input; as one GEMM (site_calls' second table, §3w),
      # do they cost less, consumers included? (~40 Triton compiles: after the CUDA-graph training, which matters more)
      step site-calls 100 bench site_calls --keys 64,256 --variants three,fused-attention,fused-attention:64/8,fused-attention:32/4
      # the same with --unet-fp8 (session 19, §3u: the frozen U-Net's linear layers as float8 GEMMs), on the same
      # warm machine right after it: the A/B of what float8 GEMMs add to the fastest SD1.5 step
      step training-reduce-overhead-sd15-fp8 170 train --models sd15 --no-floor --compile inductor --compile-mode reduce-overhead --unet-fp8 --warmup 5 --steps 10
      # the step's host work alone, no U-Net kernel (session 13 on the CPU: the adapter adds 0.11 ms per SD1.5 step
      # to 0.87): this host's figure, SD1.5 and SDXL. (Session 23: cut at 111 s in SDXL's compile, SD1.5's rows lost;
      # a cut step now writes the models it finished)
      step sampling-host-only 200 bench sampling_overhead --modes clip --compile host-only --no-real-flops --repeats 9 --warmup 1 --step-clock synced
      # the same for SDXL, whose compiled step idles ~32 ms of 213 on the host (§5g): kernel launches that a replay
      # takes off the host; the way to the ~22 img/s its kernels allow (the compile: ~230 s in session 12)
      step training-reduce-overhead-sdxl 380 train --models sdxl --no-floor --compile inductor --compile-mode reduce-overhead --warmup 5 --steps 10
      # plain inductor (no CUDA graphs) with both site kernels: auto keeps the three kernels there until this says
      # whether the one kernel's per-call dispatch (eager: +16 % against +8 %, §5h) costs more than it saves
      step sampling-compiled-sd15 150 bench sampling_overhead --models sd15 --modes clip --compile inductor --no-real-flops --repeats 15 --site-kernel torch,fused-attention
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
      # convolutions (batch 32) run nearer their peak? (the first SD1.5 training step on a fresh machine also builds
      # its feature cache, ~20 s)
      step training-compiled-sd15-b32 170 train --models sd15 --batch sd15=32 --no-floor --compile inductor --warmup 4 --steps 8
      # the new path's attention backend under CUDA graphs: SD1.5's three-kernel sites spent 0.17 of their 0.37 ms
      # in cuDNN's flash attention (session 23's profile, 16 calls over 64 keys): is another backend faster, and what
      # does the mask cost (unmasked: a lower bound, wrong where tokens are masked)?
      step sampling-reduce-overhead-sd15-attend 240 bench sampling_overhead --models sd15 --modes clip --compile inductor --compile-mode reduce-overhead --no-real-flops --repeats 9 --site-kernel torch --attend efficient,cudnn,unmasked --step-clock pipelined
      # session 12: +12.3 % +- 2.4 with ~210 per-run inputs copied per replay (on top of every weight: §3n); auto
      # keeps the three kernels under this backend until check 12 and this say otherwise
      step sampling-cudagraphs-sdxl 130 bench sampling_overhead --models sdxl --modes clip --compile cudagraphs --no-real-flops --repeats 7 --warmup 1 --step-clock synced --site-kernel torch,fused-attention
      # the whole bucket (one static graph, the default since session 9) against the span (a static graph, then a
      # dynamic one, which inductor on the CPU compiled wrongly): does CUDA run it, and faster per step?
      step training-compiled-span-sd15 130 train --models sd15 --no-floor --compile inductor --no-compile-whole-bucket --warmup 5 --steps 10
      # channels-last was slower eager (§5c); under inductor NHWC convolutions may win: against session 10's 147.6
      step training-compiled-channels-last-sd15 130 train --models sd15 --no-floor --compile inductor --channels-last --warmup 5 --steps 10
      step training-no-cudnn-benchmark 60 train --models sd15 --no-floor --steps 12 --warmup 3 --no-cudnn-benchmark
      step profile-compiled-sd15 150 bash -c "python3 bench/profile_sampling.py $DEVICE_ARGS --model sd15 --mode clip --compile inductor > $OUTDIR/profile-compiled-sd15.txt"
      step sampling-compiled-sdxl 300 bench sampling_overhead --models sdxl --modes clip --compile inductor --no-real-flops --repeats 5 --warmup 1 --site-kernel torch,fused-attention ;;
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
