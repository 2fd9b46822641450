#!/usr/bin/env bash
# Run the test suite against a real ComfyUI: the pinned runtime (built on first use, see
# scripts/setup_env.sh), or your own install with LLMDIFF_COMFYUI_ROOT=/path/to/ComfyUI
# (then LLMDIFF_PYTHON is the interpreter that runs it, default python3). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source scripts/runtime.sh
exec "$PY" -m pytest "$@"
