#!/usr/bin/env bash
# The whole test suite on the oldest releases the package supports: torch 2.6 with the Triton it
# brings (3.2), then every Triton kernel compiled for sm_90 by that Triton (.ci/compile_triton.py).
# Runs in a virtual environment and a copy of the tree of its own (the C++ extension is built for
# that torch, CPU kernels only), so the main install is left as it is.
#
#   bash .ci/min_versions.sh            # or: make test-min
#
# Environment: MIN_TORCH (default "torch==2.6.0 torchvision==0.21.0"), MIN_DIR (work folder,
# default a new temporary one, removed at the end), PYTEST_ARGS.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
MIN_TORCH="${MIN_TORCH:-torch==2.6.0 torchvision==0.21.0}"
if [ -n "${MIN_DIR:-}" ]; then
  work="$MIN_DIR"; mkdir -p "$work"
else
  work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
fi
start=$(date +%s)

echo "::group::environment with $MIN_TORCH"
[ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
py="$work/venv/bin/python"
# numpy < 2.4: the Triton 3.2 interpreter (the CPU test path) cannot run kernels with newer numpy
"$py" -m pip install -q $MIN_TORCH "numpy<2.4" "setuptools>=64" wheel ninja pytest pytest-benchmark \
  pillow matplotlib tqdm
echo "::endgroup::"

echo "::group::copy of the tree, extension built for this torch"
rm -rf "$work/src" && mkdir -p "$work/src"
# tracked files and new ones not ignored (what a commit of the working tree would hold)
(cd "$root" && git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$work/src"
cd "$work/src"
FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$py" -m pip install -q --no-deps --no-build-isolation -e .
"$py" -m icakd_fast.info
echo "::endgroup::"

echo "test suite on $("$py" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
# every backend must run here: their tests would otherwise skip themselves and pass by testing less
ICAKD_TEST_REQUIRE=triton,cpp "$py" -m pytest tests -q -p no:cacheprovider ${PYTEST_ARGS:-}
# the interpreted tests cannot tell whether this Triton's compiler takes the kernels
"$py" .ci/compile_triton.py
echo "oldest supported releases: tests and compile check passed in $(( $(date +%s) - start )) s"
