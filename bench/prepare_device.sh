#!/usr/bin/env bash
# Before a GPU session (here, with internet to PyPI): put what the device machine lacks into .bench/.
# The lent GPU machine has torch + CUDA, transformers, accelerate, safetensors, but neither ComfyUI nor
# the two small wheels ComfyUI's samplers import, and it cannot download. .bench/ is git-ignored and is
# carried to the device with run(carry=[".bench"]); then bench/device_run.sh runs there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
{ read -r PY; read -r ROOT; } < <(scripts/setup_env.sh)
rm -rf .bench
mkdir -p .bench
cp -r "$ROOT" .bench/ComfyUI          # the pinned ComfyUI 0.3.75 (~25 MB)
rm -rf .bench/ComfyUI/custom_nodes/* .bench/ComfyUI/models/*/*.safetensors 2>/dev/null || true
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .bench/whl torchsde==0.2.6 trampoline==0.1.2
du -sh .bench
echo "ready: run(carry=[\".bench\"], timeout_s=600, command=\"DEVICE_BUDGET_S=530 bench/device_run.sh next\") (or all)" >&2
