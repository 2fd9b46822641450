# Sourced (from the repository root) by test.sh, bench/run_all.sh and scripts/coverage.sh: sets PY, the interpreter
# that runs ComfyUI, and exports LLMDIFF_COMFYUI_ROOT. Your own install when LLMDIFF_COMFYUI_ROOT is set (then
# LLMDIFF_PYTHON, default python3), else the pinned runtime of scripts/setup_env.sh (built on first use).
if [ -n "${LLMDIFF_COMFYUI_ROOT:-}" ]; then
  PY=${LLMDIFF_PYTHON:-python3}
else
  { read -r PY; read -r LLMDIFF_COMFYUI_ROOT; } < <(scripts/setup_env.sh)
fi
export LLMDIFF_COMFYUI_ROOT
