#!/usr/bin/env bash
# GPU check, in one go on a CUDA machine: the `gpu`-marked tests, then every benchmark in
# benchmarks/ (all test_bench_*.py files), then a compact Markdown table of the timings.
#
#     benchmarks/gpu_check.sh [OUTPUT_DIR]        (default: runs/gpu_check)
#
# OUTPUT_DIR receives gpu_tests.txt, benchmarks.txt, benchmarks.json (pytest-benchmark) and
# benchmarks.md (the table, also printed). Uses .venv/bin/python when present, else python3; if
# dino_fast is not importable it is installed in place (editable, no dependencies, offline).
# Exits non-zero when a test or a benchmark fails, after running everything it can.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
OUT="${1:-runs/gpu_check}"
mkdir -p "$OUT"

"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device here; this script is for a GPU machine")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}")
EOF
if ! "$PY" -c "import dino_fast.kernels" 2>/dev/null; then
    echo "gpu_check.sh: installing dino_fast in place (editable, --no-deps)"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi

status=0
echo "== pytest -m gpu tests"
"$PY" -m pytest -m gpu tests -q -rfEs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" \
    || status=$?

echo "== pytest benchmarks --benchmark-only"
rm -f "$OUT/benchmarks.json"
"$PY" -m pytest benchmarks --benchmark-only -q -rfE -p no:cacheprovider \
    --benchmark-json="$OUT/benchmarks.json" > "$OUT/benchmarks.txt" 2>&1 || status=$?
tail -n 3 "$OUT/benchmarks.txt"

if [ -s "$OUT/benchmarks.json" ]; then
    "$PY" -m benchmarks.report "$OUT/benchmarks.json" --markdown "$OUT/benchmarks.md"
    echo
    cat "$OUT/benchmarks.md"
else
    echo "gpu_check.sh: no benchmark JSON was written; see $OUT/benchmarks.txt" >&2
    status=1
fi
echo "gpu_check.sh: outputs in $OUT (exit status $status)"
exit "$status"
