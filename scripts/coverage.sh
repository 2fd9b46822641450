#!/usr/bin/env bash
# Line coverage of the product (llmdiff_core/, nodes/, the entry point) by the test suite, its subprocesses
# included: the ComfyUI servers, train.py runs, the Triton interpreter and the other-release runs start coverage
# through a sitecustomize on PYTHONPATH. A development tool, not part of ./test.sh (about 26 minutes on 2 cores,
# 1.4x the suite): coverage is installed into a temporary folder, so neither the pack nor the pinned runtime
# depends on it. Runs against the same ComfyUI as ./test.sh; extra arguments go to pytest.
#   scripts/coverage.sh                         the whole suite, then the report of what no test ran
#   scripts/coverage.sh tests/test_train_data.py
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/runtime.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip install --quiet --disable-pip-version-check --target "$work/site" "coverage==7.17.5"
cat > "$work/site/sitecustomize.py" <<'PYTHON'
import os
if os.environ.get("COVERAGE_PROCESS_START"):
    import coverage
    coverage.process_startup()
PYTHON
cat > "$work/coveragerc" <<CONFIG
[run]
parallel = true
data_file = $work/data/.coverage
include =
    */llmdiff_core/*
    */nodes/*
    */ComfyUI-LLMDiff/__init__.py
    $PWD/__init__.py
[paths]
repo =
    $PWD/
    */custom_nodes/ComfyUI-LLMDiff/
[report]
skip_covered = true
show_missing = true
CONFIG
mkdir -p "$work/data"
status=0
PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" COVERAGE_PROCESS_START="$work/coveragerc" \
  "$PY" -m pytest -q -p no:cacheprovider "$@" || status=$?
PYTHONPATH="$work/site" "$PY" -m coverage combine --quiet --rcfile="$work/coveragerc"
PYTHONPATH="$work/site" "$PY" -m coverage report --rcfile="$work/coveragerc"
exit $status
