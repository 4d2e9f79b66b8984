#!/usr/bin/env bash
# GPU check, in one go on a CUDA machine with nothing reachable outside: the `gpu`-marked tests,
# then the CUDA parameters of every benchmark (CPU sizes are skipped), then a Markdown table.
#
#     benchmarks/gpu_check.sh [OUTPUT_DIR]        (default: runs/gpu_check)
#
# Runs on the machine's own python3 (or $PYTHON): torch, triton, timm and pytest-benchmark must
# be there already; dino_fast itself is installed in place if it is not importable (editable,
# --no-deps, offline). Each phase has a time limit so that the whole check ends within
# 8 minutes, Triton and inductor compilation included:
#     GPU_TESTS_LIMIT (default 200 s), GPU_BENCH_LIMIT (default 250 s, shared by the files).
# Where pytest-xdist is importable the tests run in GPU_TESTS_WORKERS processes (default 8),
# which compile their Triton kernels in parallel; the benchmarks always run one at a time.
# OUTPUT_DIR receives gpu_tests.txt, benchmarks.txt, benchmarks.json (pytest-benchmark) and
# benchmarks.md (the table, also printed). Exits non-zero when a test or a benchmark fails or a
# phase runs out of time, after running everything it can.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT="${1:-runs/gpu_check}"
mkdir -p "$OUT"
START=$SECONDS

"$PY" - <<'EOF' || exit 1
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device here; this script is for a GPU machine")
import triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"Python {sys.version.split()[0]} on {torch.cuda.get_device_name()}")
EOF
if ! "$PY" -c "import dino_fast.kernels" 2>/dev/null; then
    echo "gpu_check.sh: installing dino_fast in place (editable, --no-deps)"
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>/dev/null; then
        # no setuptools or pip: the package as setup.py lays it out (kernels/ is
        # dino_fast.kernels), made of links to the tree, on PYTHONPATH
        PKG="$(mktemp -d)/dino_fast"
        mkdir -p "$PKG"
        ln -s "$PWD"/dino_fast/* "$PKG"/
        ln -s "$PWD/kernels" "$PKG/kernels"
        export PYTHONPATH="$(dirname "$PKG")${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_check.sh: pip could not install it; using links in $PKG"
    fi
    "$PY" -c "import dino_fast.kernels" || exit 1
fi

status=0
workers=()
if "$PY" -c "import xdist" 2>/dev/null; then
    workers=(-n "${GPU_TESTS_WORKERS:-8}")
fi
echo "== pytest -m gpu tests ${workers[*]} (limit ${GPU_TESTS_LIMIT:-200} s)"
timeout "${GPU_TESTS_LIMIT:-200}" "$PY" -m pytest -m gpu tests -q -rfE -p no:cacheprovider \
    "${workers[@]}" \
    > "$OUT/gpu_tests.txt" 2>&1
rc=$?
[ $rc -eq 124 ] && echo "gpu_check.sh: the GPU tests ran out of time" | tee -a "$OUT/gpu_tests.txt"
[ $rc -ne 0 ] && status=1
tail -n 15 "$OUT/gpu_tests.txt"

echo "== pytest -m gpu benchmarks --benchmark-only, file by file (limit ${GPU_BENCH_LIMIT:-250} s)"
# one JSON per file (pytest-benchmark writes it when pytest exits: a file cut by its time
# limit loses only its own figures), merged for the table
rm -f "$OUT"/benchmarks*.json "$OUT/benchmarks.txt"
# shares of the limit, in percent: the loss file has the most CUDA sizes; the ViT and the
# training step pay for inductor compilation
declare -A share=([test_bench_loss]=30 [test_bench_ema]=8 [test_bench_train_step]=22
                  [test_bench_vit]=25 [test_bench_augmentation]=5 [test_bench_dinov2]=10)
for f in benchmarks/test_bench_*.py; do
    name=$(basename "$f" .py)
    per_file=$(( ${GPU_BENCH_LIMIT:-250} * ${share[$name]:-10} / 100 ))
    timeout "$per_file" "$PY" -m pytest -m gpu "$f" --benchmark-only -q -rfE \
        -p no:cacheprovider --benchmark-json="$OUT/benchmarks_$name.json" \
        >> "$OUT/benchmarks.txt" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "gpu_check.sh: $f ran out of its $per_file s" | tee -a "$OUT/benchmarks.txt"
    [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1
done
tail -n 5 "$OUT/benchmarks.txt"
"$PY" - "$OUT" <<'EOF'
import glob, json, sys
out = sys.argv[1]
merged = None
for path in sorted(glob.glob(f"{out}/benchmarks_*.json")):
    data = json.load(open(path))
    if merged is None:
        merged = data
    else:
        merged["benchmarks"] += data["benchmarks"]
if merged is not None:
    json.dump(merged, open(f"{out}/benchmarks.json", "w"), indent=1)
EOF

if [ -s "$OUT/benchmarks.json" ]; then
    "$PY" -m benchmarks.report "$OUT/benchmarks.json" --markdown "$OUT/benchmarks.md"
    echo
    cat "$OUT/benchmarks.md"
else
    echo "gpu_check.sh: no benchmark JSON was written; see $OUT/benchmarks.txt" >&2
    status=1
fi
echo "gpu_check.sh: outputs in $OUT, $((SECONDS - START)) s (exit status $status)"
exit "$status"
