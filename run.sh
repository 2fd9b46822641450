#!/usr/bin/env bash
# Start ComfyUI with this pack loaded, in the foreground (Ctrl-C stops it).
#
#   ./run.sh [--port N] [--demo] [-- extra ComfyUI args]
#
# ComfyUI: yours if LLMDIFF_COMFYUI_ROOT=/path/to/ComfyUI is set (run by LLMDIFF_PYTHON, default
# python3), else the pinned CPU runtime that scripts/setup_env.sh builds on first use (~3 min) and
# reuses afterwards. The pack is linked in as custom_nodes/ComfyUI-LLMDiff -> this checkout.
# Port: --port, else $PORT, else 8188. Listens on 127.0.0.1 only.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PACK_NAME=ComfyUI-LLMDiff
PORT=${PORT:-8188}
DEMO=0
EXTRA=()

usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "run.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --port) [ $# -ge 2 ] || die "--port needs a number"; PORT=$2; shift 2 ;;
    --port=*) PORT=${1#--port=}; shift ;;
    --demo) DEMO=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (ComfyUI's own options go after '--'; see --help)" ;;
  esac
done
[[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "bad port '$PORT'"

# --- which ComfyUI, which Python -------------------------------------------------------------
if [ -n "${LLMDIFF_COMFYUI_ROOT:-}" ]; then
  PY=${LLMDIFF_PYTHON:-python3}
  ROOT=$(cd "$LLMDIFF_COMFYUI_ROOT" 2>/dev/null && pwd) || die "LLMDIFF_COMFYUI_ROOT=$LLMDIFF_COMFYUI_ROOT is not a directory"
  command -v "$PY" >/dev/null || die "interpreter '$PY' not found (set LLMDIFF_PYTHON to the python that runs your ComfyUI)"
else
  { read -r PY; read -r ROOT; } < <("$REPO/scripts/setup_env.sh")
fi
[ -f "$ROOT/main.py" ] && [ -d "$ROOT/comfy" ] || die "$ROOT is not a ComfyUI root (no main.py + comfy/)"

# --- link the pack into custom_nodes ---------------------------------------------------------
# A symlink keeps one copy of the code: edits here show up on the next ComfyUI start.
NODES_DIR="$ROOT/custom_nodes"
LINK="$NODES_DIR/$PACK_NAME"
mkdir -p "$NODES_DIR"
if [ "$(cd "$REPO/.." && pwd -P)" = "$(cd "$NODES_DIR" && pwd -P)" ]; then
  : # this checkout already lives in custom_nodes (e.g. git clone there): a link would load it twice
elif [ -L "$LINK" ]; then
  if [ "$(readlink -f "$LINK")" != "$(cd "$REPO" && pwd -P)" ]; then
    echo "run.sh: re-pointing $LINK (was -> $(readlink "$LINK")) to $REPO"
    ln -sfn "$REPO" "$LINK"
  fi
elif [ -e "$LINK" ]; then
  die "$LINK exists and is not a symlink (another copy of the pack?). Move it away or remove it, then rerun; run.sh will not overwrite it."
else
  ln -s "$REPO" "$LINK"
  echo "run.sh: linked $LINK -> $REPO"
fi

# --- Python requirements: install only what is missing or too old ----------------------------
# pip is never run when everything is satisfied, so a working ComfyUI env is left untouched.
MISSING=$("$PY" - "$REPO/requirements.txt" <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
try:
    from packaging.requirements import Requirement
except ImportError:  # no `packaging`: check presence only
    Requirement = None
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name = Requirement(line).name if Requirement else re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]
    try:
        have = version(name)
    except PackageNotFoundError:
        print(line); continue
    if Requirement and not Requirement(line).specifier.contains(have, prereleases=True):
        print(line)
EOF
)
if [ -n "$MISSING" ]; then
  echo "run.sh: installing into $PY: $(echo "$MISSING" | tr '\n' ' ')"
  "$PY" -m pip install -r "$REPO/requirements.txt" || die "pip install failed for $PY (a system Python may refuse: use a venv and LLMDIFF_PYTHON)"
fi

# --- model folders ---------------------------------------------------------------------------
mkdir -p "$ROOT/models/LLM" "$ROOT/models/llmdiff"

if [ "$DEMO" = 1 ]; then
  # Hook for the demo assets (stand-in models so the example workflows run); its own issue.
  if [ -f "$REPO/llmdiff_core/demo_models.py" ]; then
    (cd "$REPO" && "$PY" -m llmdiff_core.demo_models "$ROOT")
  else
    echo "run.sh: --demo: demo assets are not available yet; starting ComfyUI without them."
  fi
fi

# --- start ------------------------------------------------------------------------------------
# Without CUDA (or Apple MPS / Intel XPU) ComfyUI must be told --cpu, else it dies on CUDA init.
CPU=()
if ! "$PY" -c "import sys, torch
ok = torch.cuda.is_available() or (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()) \
     or (hasattr(torch, 'xpu') and torch.xpu.is_available())
sys.exit(0 if ok else 1)" 2>/dev/null; then
  CPU=(--cpu)
fi

# A server already on the port would answer the browser instead of this one (see the PID trap in
# reference/test-environment.md §4): refuse rather than "start" against a stale process.
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  die "port $PORT is already in use (find it: ss -ltnp | grep :$PORT). Stop it or pass --port N."
fi

echo "run.sh: ComfyUI at $ROOT, python $PY ${CPU[*]}"
echo "run.sh: open http://127.0.0.1:$PORT/  (Ctrl-C stops the server)"
# cd on its own line, then exec: the server *is* this process, so Ctrl-C / kill of this PID stop it.
cd "$ROOT"
# ${A[@]+"${A[@]}"}: empty arrays under `set -u` on old bash (macOS 3.2).
exec "$PY" main.py --listen 127.0.0.1 --port "$PORT" ${CPU[@]+"${CPU[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
