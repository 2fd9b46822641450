#!/usr/bin/env bash
# Install a second torch release beside the pinned runtime, for tests/test_torch_compat.py: the compiled
# tests (graph counts, no break, eager results) then run under it too. The suite's torch (scripts/pins.txt)
# is the newest; dynamo's reach differs between releases, and a construct the newest traces can break the
# graph under an older one (session 21: bool() of a dict, 27 breaks per compiled sampling run on the GPU
# machines' torch 2.11, invisible under 2.13). This is the GPU machines' torch, where the benchmarks run.
#
#   scripts/setup_torch_compat.sh     prints the folder to put first on PYTHONPATH
#
# PyPI has only torch's CUDA build for Linux: it imports without a GPU, but with its CUDA libraries, a
# ~3 GB download (~4.6 GB installed), so scripts/setup_env.sh (./run.sh's setup) does not install it.
# .ci/run does; elsewhere the test skips without it.
set -euo pipefail
TORCH_COMPAT=2.11.0
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
{ read -r VPY; read -r ROOT; } < <("$HERE/setup_env.sh")
SITE="$(dirname "$ROOT")/compat/torch-$TORCH_COMPAT"
STAMP="$SITE/.complete"
if [ ! -f "$STAMP" ]; then
  mkdir -p "$(dirname "$SITE")"
  exec 9>"$SITE.lock"
  flock 9
  if [ ! -f "$STAMP" ]; then
    echo "[setup_torch_compat] torch==$TORCH_COMPAT and its CUDA libraries into $SITE (~3 GB download)" >&2
    rm -rf "$SITE"
    # its own dependencies too (sympy, triton, the CUDA libraries), as a user of that release has them
    "$VPY" -m pip install --disable-pip-version-check -q --target "$SITE" "torch==$TORCH_COMPAT" \
      2> >(grep -v -e "is ignored: it is neither" -e "incompatible" -e "dependency conflicts" \
                   -e "pip's dependency resolver" >&2)
    PYTHONPATH="$SITE" "$VPY" -W ignore -c \
      "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_COMPAT' else torch.__version__)"
    touch "$STAMP"
  fi
fi
echo "$SITE"
