#!/usr/bin/env bash
# One prepared GPU session: install without network, build the CUDA extension, run the GPU tests,
# run the GPU benchmark. Every stage logs under $OUT (default ./gpu-out) and a failing stage never
# stops the later ones. Usage: bash benchmarks/gpu_run.sh [OUT_DIR]
set -u
OUT=${1:-${OUT:-gpu-out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nproc
} 2>&1 | tee "$OUT/env.txt"

# 1. the package (pure Python first, so tests can start at once), then the CUDA extension in the background
ICAKD_SKIP_EXT=1 $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || echo "pure install failed" | tee -a "$OUT/summary.txt"
( export FORCE_CUDA=1 ICAKD_CUDA_ARCHS=${ICAKD_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-12}
  t0=$(date +%s)
  timeout 300 $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; rc=$?
  echo "cuda extension build rc=$rc in $(( $(date +%s) - t0 )) s" >> "$OUT/build.log" ) &
build_pid=$!

# 2. Triton on the GPU: the kernel tests (the same files CI runs under the interpreter) + GPU-only tests
timeout -s INT ${TRITON_TESTS_TIMEOUT:-180} $PY -m pytest tests/test_gpu.py tests/test_triton_*.py -q -rf --tb=short -p no:cacheprovider -m "not slow" \
  > "$OUT/tests_triton_gpu.log" 2>&1
echo "triton gpu tests rc=$? : $(tail -n 1 "$OUT/tests_triton_gpu.log")"; grep -E "^FAILED|^ERROR" "$OUT/tests_triton_gpu.log" | head -20 | tee -a "$OUT/summary.txt"

wait $build_pid
tail -n 1 "$OUT/build.log" | tee -a "$OUT/summary.txt"
$PY -m icakd_fast.info 2>&1 | tee -a "$OUT/summary.txt"

# 3. the benchmark (checks correctness before timing)
timeout -s INT ${BENCH_TIMEOUT:-150} $PY benchmarks/gpu_bench.py --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/summary.txt"

# 4. the CUDA extension's tests (GPU-marked ones included)
timeout -s INT ${CPP_TIMEOUT:-80} $PY -m pytest tests/test_cpp_gpu.py tests/test_cpp_ops.py -k "not bad_arguments" -q -rf --tb=short -p no:cacheprovider -m "not slow" > "$OUT/tests_cpp_gpu.log" 2>&1
echo "cpp tests rc=$? : $(tail -n 1 "$OUT/tests_cpp_gpu.log")"; grep -E "^FAILED|^ERROR" "$OUT/tests_cpp_gpu.log" | head -20 | tee -a "$OUT/summary.txt"
tail -n 40 "$OUT/bench.log"
