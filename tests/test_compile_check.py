"""``.ci/compile_triton.py`` (CI compiles every kernel specialisation with it) must reach every
kernel: a launcher case missing from its matrix would leave that kernel compiled by nobody
before it meets a GPU."""

import ast
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kernels_in_source():
    """Names of the ``@triton.jit`` functions launched from the host (``*_kernel``)."""
    names = set()
    folder = os.path.join(ROOT, "kernels")
    for fn in sorted(os.listdir(folder)):
        if not fn.endswith(".py"):
            continue
        with open(os.path.join(folder, fn)) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    names.add(node.name)
    return names - {"_interpreter_check_kernel"}  # runs only under the interpreter (a self-check)


@pytest.mark.parametrize("quick", [True, False])
def test_the_compile_check_reaches_every_kernel(quick):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, os.path.join(ROOT, ".ci", "compile_triton.py"), "--list"] + (["--quick"] if quick else [])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    listed = {line.split()[0] for line in proc.stdout.splitlines()[1:] if line.startswith("  ")}
    expected = _kernels_in_source()
    assert len(expected) >= 20
    missing = expected - listed
    # the quick matrix leaves out the shapes that need more pixels than one fused tile
    allowed = {"_cam_map_kernel"} if quick else set()
    assert missing <= allowed, f"kernels no case of .ci/compile_triton.py launches: {sorted(missing - allowed)}"
