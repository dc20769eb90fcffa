#!/usr/bin/env bash
# One prepared GPU session, no network needed: install, build the CUDA extension, run the GPU
# tests, the kernel benchmark and the end-to-end / scale / peer benchmark. Every stage logs under
# $OUT (default ./gpu-out), has its own time limit, and a failing stage never stops the later
# ones. The whole script stays under about 8.5 minutes on an H100/H200 machine with 16 cores.
#
#   bash benchmarks/gpu_run.sh [OUT_DIR]
#
# Optional: peer packages as wheels in ./.whl (pytorch-metric-learning, grad-cam, ttach) are
# installed into a private folder first (see benchmarks/README.md). Stage limits (seconds):
# TRITON_TESTS_TIMEOUT, BENCH_TIMEOUT, HOST_TIMEOUT, E2E_BUDGET, MEMORY_TIMEOUT, INTER_INC_TIMEOUT,
# STEP_TIMEOUT, CPP_TIMEOUT, STEP_TESTS_TIMEOUT, NCU_TIMEOUT.
set -u
OUT=${1:-${OUT:-gpu-out}}
mkdir -p "$OUT"
# results come back as few files: summary.txt, gpu_bench.{json,csv}, host_profile.txt, e2e_bench.{json,csv} in $OUT;
# every log goes to $LOGS and is packed into $OUT/logs.tgz after each stage
LOGS=${LOGS:-/tmp/icakd_gpu_logs}
mkdir -p "$LOGS"
pack() { tar czf "$OUT/logs.tgz" -C "$LOGS" . 2> /dev/null; }
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/summary.txt"; pack; }
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nproc
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"

# 0. peer packages (benchmark-only) from carried wheels
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl/*.whl \
    && export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH} && stamp "peer wheels installed"
fi

# 0b. the C++ extension must be built with a compiler whose C++ runtime matches torch's: on the
#     H100/H200 image, CXX points at /opt/gcc/bin/g++, and ANY torch extension built with it
#     (even a five-line one) crashes the process when an op raises; the system g++ works.
if [ -x /usr/bin/g++ ] && [ "${CXX:-}" != "/usr/bin/g++" ] && [ -z "${KEEP_CXX:-}" ]; then
  stamp "CXX=${CXX:-unset} -> /usr/bin/g++ for the extension build"
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
fi

# 1. the package (pure Python first, so tests can start at once), then the CUDA extension in the
#    background at low priority (it shares the CPU with Triton's compiler and the host-side timers)
ICAKD_SKIP_EXT=1 $PY -m pip install -q --no-deps --no-build-isolation -e . > "$LOGS/build.log" 2>&1 || stamp "pure install failed"
( export FORCE_CUDA=1 ICAKD_CUDA_ARCHS=${ICAKD_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-6}
  t0=$(date +%s)
  timeout 300 nice -n 19 $PY setup.py build_ext --inplace >> "$LOGS/build.log" 2>&1; rc=$?
  echo "cuda extension build rc=$rc in $(( $(date +%s) - t0 )) s" >> "$LOGS/build.log" ) &
build_pid=$!
stamp "installed; extension building in the background"

# 2. Triton on the GPU: the kernel tests (the files CI runs under the interpreter) + GPU-only tests
XDIST=""
$PY -c "import xdist" 2> /dev/null && XDIST="-n 6"
timeout -s INT ${TRITON_TESTS_TIMEOUT:-80} $PY -m pytest tests/test_gpu.py tests/test_triton_*.py $XDIST -q -rf --tb=short \
  -p no:cacheprovider -m "not slow" > "$LOGS/tests_gpu.log" 2>&1
stamp "triton gpu tests rc=$? : $(tail -n 1 "$LOGS/tests_gpu.log")"
grep -E "^FAILED|^ERROR" "$LOGS/tests_gpu.log" | head -20 | tee -a "$OUT/summary.txt"

# 3. kernel benchmark (checks every provider against the eager reference before timing); the
#    cpp providers need the extension, so the build (which had the Triton tests' time) ends first
wait $build_pid
stamp "$(tail -n 1 "$LOGS/build.log")"
timeout -s INT ${BENCH_TIMEOUT:-200} $PY benchmarks/gpu_bench.py --out "$OUT" --compiled-cases cam > "$LOGS/bench.log" 2>&1
stamp "kernel bench rc=$?"
$PY benchmarks/targets.py "$OUT/gpu_bench.json" --out "$OUT/targets.md" >> "$OUT/summary.txt" 2>&1

# 3b. host time per call of the small ops, every backend (the C++ one needs the build above)
timeout -s INT ${HOST_TIMEOUT:-45} $PY benchmarks/host_profile.py --out "$OUT" --calls 100 > "$LOGS/host_profile.log" 2>&1
stamp "host profile rc=$?"
tail -n 1 "$LOGS/build.log" | tee -a "$OUT/summary.txt"
$PY -m icakd_fast.info --check-extension >> "$OUT/summary.txt" 2>&1

# 4. end-to-end training steps, scale sweep, peers (its own budget; writes e2e results to $OUT)
E2E=${E2E_BUDGET:-120}
timeout -s INT $(( E2E + 30 )) $PY benchmarks/e2e_bench.py --out "$OUT" --device cuda --budget-s "$E2E" > "$LOGS/e2e.log" 2>&1
stamp "e2e bench rc=$?"
# 4b. what ICAKD keeps alive at the step's memory peak, beside KD (into the logs and the summary)
timeout -s INT ${MEMORY_TIMEOUT:-45} $PY benchmarks/e2e_bench.py --out "$LOGS/memory" --name e2e_memory --device cuda \
  --memory --preset imagenet --backends triton,cpp > "$LOGS/memory.log" 2>&1
stamp "memory breakdown rc=$?"
cat "$LOGS"/memory/e2e_memory.memory_imagenet.txt >> "$OUT/summary.txt" 2> /dev/null
# 4c. ICAKDLoss steps at the ImageNet-21k class count (C=21841, D_s=D_t=2048): the incremental
#     Gram form of the inter loss against the backend's inter op
timeout -s INT ${INTER_INC_TIMEOUT:-45} $PY benchmarks/inter_incremental_bench.py --device cuda --teacher-dim 2048 \
  --student-dim 2048 --out "$OUT" --name inter_incremental > "$LOGS/inter_incremental.log" 2>&1
stamp "incremental inter bench rc=$?"
cat "$OUT/inter_incremental.md" >> "$OUT/summary.txt" 2> /dev/null
# 4d. one ICAKDLoss training step at tiny host-bound shapes (C=100, B=64, D=8, 2x2 maps): ops and
#     us per step, ce/kd/cskd/icakd x backends x eager/compiled, interleaved (the budget leaves a
#     margin under the stage's limit for writing the results)
STEP_T=${STEP_TIMEOUT:-90}
timeout -s INT "$STEP_T" $PY benchmarks/step_bench.py --device cuda --backends reference,cpp,triton,auto \
  --compiled-backends reference,auto --steps 300 --warmup 20 --budget-s $(( STEP_T - 20 )) --out "$OUT" > "$LOGS/step.log" 2>&1
stamp "step bench rc=$?"
cat "$OUT"/step_*.md >> "$OUT/summary.txt" 2> /dev/null

# 5. the CUDA extension's tests (GPU-marked ones included)
timeout -s INT ${CPP_TIMEOUT:-40} $PY -m pytest tests/test_cpp_gpu.py tests/test_cpp_ops.py $XDIST -q -rf --tb=short \
  -p no:cacheprovider -m "not slow" > "$LOGS/tests_cpp_gpu.log" 2>&1
stamp "cpp tests rc=$? : $(tail -n 1 "$LOGS/tests_cpp_gpu.log")"
grep -E "^FAILED|^ERROR" "$LOGS/tests_cpp_gpu.log" | head -20 | tee -a "$OUT/summary.txt"

# 5b. the training step on CUDA tensors: every backend's ops against the float64 reference (the
#     conformance suite), the step's ops, and ICAKDLoss with its banks (the composed CUDA path of
#     the step ops, never run on a GPU before)
timeout -s INT ${STEP_TESTS_TIMEOUT:-120} $PY -m pytest tests/test_conformance.py tests/test_step_ops.py \
  tests/test_loss.py tests/test_bank_nonfinite.py $XDIST -q -rf --tb=short -p no:cacheprovider -m "not slow" \
  > "$LOGS/tests_step_gpu.log" 2>&1
stamp "step tests rc=$? : $(tail -n 1 "$LOGS/tests_step_gpu.log")"
grep -E "^FAILED|^ERROR" "$LOGS/tests_step_gpu.log" | head -20 | tee -a "$OUT/summary.txt"
# 6. hardware counters of the CAM and inter kernels (when Nsight Compute is present and can read them)
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2> /dev/null | head -n 1)
if [ -n "$NCU" ] && [ "${NCU_TIMEOUT:-40}" -gt 0 ]; then
  timeout -s INT ${NCU_TIMEOUT:-40} "$NCU" --kernel-name regex:"cam_|_inter_" --launch-count 40 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
    $PY benchmarks/profile_kernels.py > "$LOGS/ncu.txt" 2>&1
  stamp "ncu rc=$?"
fi
stamp "done"
