#!/usr/bin/env bash
# Build the C++ extension for CI:
#   1. the CPU extension, in place (editable install), so that tests/test_cpp_*.py run;
#   2. a compile check of the CUDA sources (FORCE_CUDA=1, one architecture) into a throwaway
#      directory: nothing in the source tree changes, no GPU is needed; then .ci/check_sass.py
#      reads the kernels' machine code (spills, vector widths).
# Environment: CUDA_HOME (default /usr/local/cuda), ICAKD_CUDA_ARCHS (default 9.0), MAX_JOBS
# (default 2), ICAKD_SKIP_CUDA_CHECK=1 to skip step 2.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-2}"

echo "::group::build the CPU extension (in place)"
start=$(date +%s)
FORCE_CUDA=0 python -m pip install --no-deps --no-build-isolation -e . 
python - <<'PY'
import icakd_fast._ext as ext
assert ext.load(), ext.reason()
print("icakd_fast._C loaded:", ext.library_path(), ext.build_info())
PY
echo "CPU extension built in $(( $(date +%s) - start )) s"
echo "::endgroup::"

if [ "${ICAKD_SKIP_CUDA_CHECK:-0}" != "1" ]; then
  echo "::group::compile check of the CUDA sources (sm_${ICAKD_CUDA_ARCHS:-9.0})"
  start=$(date +%s)
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  FORCE_CUDA=1 ICAKD_CUDA_ARCHS="${ICAKD_CUDA_ARCHS:-9.0}" \
    python setup.py -q build_ext --build-temp "$tmp/temp" --build-lib "$tmp/lib"
  ls -l "$tmp"/lib/icakd_fast/
  echo "CUDA sources compiled in $(( $(date +%s) - start )) s"
  # the machine code of every kernel: no register spills, 16-byte map accesses in cam_vec_*
  python .ci/check_sass.py "$tmp"/lib/icakd_fast/_C*.so
  echo "::endgroup::"
fi
