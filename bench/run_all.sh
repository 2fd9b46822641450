#!/usr/bin/env bash
# Run every benchmark and collect the tables (issue 5): real shapes on a GPU, --small on a CPU.
#
#   bench/run_all.sh                      # GPU if torch sees one, else the --small CPU variants
#   BENCH_ARGS="--repeats 3" bench/run_all.sh    # extra arguments for every script
#   BENCH_ONLY="score_encoding" bench/run_all.sh # a subset (space-separated script names)
#   BENCH_JSON=0 bench/run_all.sh                 # no .json files (the device tool returns at most 8 files)
#   BENCH_ONLY="sampling-compiled" bench/run_all.sh  # GPU, opt-in: sampling under torch.compile (inductor)
#   BENCH_ONLY="training-compiled" bench/run_all.sh  # GPU, opt-in: training with --compile-unet inductor
#
# Interpreter and ComfyUI root as in test.sh: LLMDIFF_COMFYUI_ROOT (+ LLMDIFF_PYTHON, default python3),
# else the pinned runtime from scripts/setup_env.sh. Output: bench/results/<UTC stamp>-<gpu|cpu-small>.md
# (all tables) plus one .json per run, and the profiles as .txt (BENCH_OUT changes the folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/runtime.sh
export PYTHONUNBUFFERED=1
OUTDIR=${BENCH_OUT:-bench/results}
mkdir -p "$OUTDIR"
if [ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')" = 1 ]; then
  MODE=gpu; SMALL=()
else
  MODE=cpu-small; SMALL=(--small)
fi
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
MD="$OUTDIR/$STAMP-$MODE.md"
ONLY=" ${BENCH_ONLY:-sampling_overhead score_encoding training_throughput encoder_span run_features cache_reads attend_calls workflow_memory profile_sampling} "
# shellcheck disable=SC2086
run() {  # run <label> <script> [args...]
  local label=$1 script=$2; shift 2
  [[ "$ONLY" == *" $script "* ]] || return 0
  echo "== $label ($MODE)" >&2
  local json=()
  [ "${BENCH_JSON:-1}" = 0 ] || json=(--json "$OUTDIR/$STAMP-$MODE-$label.json")
  "$PY" "bench/$script.py" "${SMALL[@]}" "$@" ${BENCH_ARGS:-} --markdown "$MD" "${json[@]}"
}
profile() {  # profile <label> [args...]: torch/cProfile tables, as text
  local label=$1; shift
  [[ "$ONLY" == *" profile_sampling "* ]] || return 0
  echo "== $label ($MODE)" >&2
  "$PY" bench/profile_sampling.py "${SMALL[@]}" "$@" | tee "$OUTDIR/$STAMP-$MODE-$label.txt"
}

run sampling sampling_overhead
if [ "$MODE" = gpu ]; then
  # the adapter as training exports it (fp32) vs the loader's default (projections in fp16 on a GPU)
  run sampling-fp32-adapter sampling_overhead --modes clip,llm --adapter-dtype fp32 --no-real-flops
fi
if [ "$MODE" = gpu ] && [[ "$ONLY" == *" sampling-compiled "* ]]; then
  # opt-in (minutes of inductor compile): both models under ComfyUI's torch.compile wrapper
  # (TorchCompileModel), unpatched vs adapter, each compiled; BENCH_ONLY="sampling-compiled"
  ONLY="$ONLY sampling_overhead " run sampling-compiled sampling_overhead --compile inductor --no-real-flops
fi
run encoding score_encoding
run training training_throughput
if [ "$MODE" = gpu ] && [[ "$ONLY" == *" training-compiled "* ]]; then
  # opt-in: the same runs with the frozen U-Net compiled (inductor; the warmup steps compile). Channels-last
  # is left out: it was slower on the GPU (docs/benchmarks.md §5c)
  ONLY="$ONLY training_throughput " run training-compiled training_throughput --compile inductor --warmup 5
fi
if [ "$MODE" = cpu-small ]; then
  # the data path at Llama-3-8B feature shapes (a thin 8B-shaped LLM builds the cache), SD1.5 batch 16
  run training-8b-features training_throughput --models sd15 --llm thin8b --batch 16 --samples 32 --steps 3 --warmup 1
fi
run encoder-span encoder_span
run run-features run_features
run cache-reads cache_reads
run attend-calls attend_calls
run workflow workflow_memory
profile profile-sd15-hybrid --model sd15 --mode clip
profile profile-sdxl-hybrid --model sdxl --mode clip --steps 10
echo "tables: $MD" >&2
