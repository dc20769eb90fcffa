"""What the Triton CAM kernels compile to for an H100/H200 (sm_90), checked on any machine.

``benchmarks/kernel_static.py`` compiles the launches of one forward + backward with Triton's own
ptxas and reads the machine code with the cuobjdump shipped beside it; no GPU is needed. These
tests pin the properties the kernels were designed for, so a change that silently turns 16-byte
accesses into scalar ones, makes the compiler spill, or multiplies the work per element fails here
rather than only in a GPU benchmark.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
from icakd_fast.kernels._common import TRITON_VERSION  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(
    not all(os.path.exists(os.path.join(_BIN, t)) for t in ("ptxas", "cuobjdump")),
    reason="Triton without its NVIDIA backend binaries (ptxas, cuobjdump)")


def _static_rows(folder, *args):
    """The rows of ``kernel_static.py ARGS`` (run without the interpreter, as a script)."""
    out = folder / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_static.py"), *args,
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())["rows"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """B=64 K=1024 7x7 bfloat16: every vec kernel runs its channel loop more than once."""
    return _static_rows(tmp_path_factory.mktemp("static"), "--shape", "64", "1024", "7", "7")


def _get(rows, variant, kernel):
    found = [r for r in rows if r["variant"] == variant and r["kernel"] == kernel]
    assert found, f"no {variant} launch of {kernel}"
    return found[0]


def test_every_launch_is_reported(rows):
    kernels = {(r["variant"], r["phase"], r["kernel"]) for r in rows}
    assert ("split", "fwd", "_cam_partial_kernel") in kernels
    assert ("split", "fwd", "_cam_pool_kernel") in kernels
    assert ("split", "bwd", "_cam_bwd_kernel") in kernels
    assert ("image", "fwd", "_cam_image_kernel") in kernels
    # vec forward: two launches, the pooling pass reduces the partial sums itself at this size
    vec = {(p, k) for v, p, k in kernels if v == "vec"}
    assert vec == {("fwd", "_cam_partial_vec_kernel"), ("fwd", "_cam_pool_vec_kernel"), ("bwd", "_cam_bwd_vec_kernel")}


def test_no_kernel_spills(rows):
    spilled = [(r["variant"], r["kernel"], r["local"]) for r in rows if r["local"]]
    assert not spilled, f"stack / local memory in use (register spills): {spilled}"


def test_vec_kernels_move_the_map_in_16_byte_accesses(rows):
    """The map is read (and dA written) as 16-byte vectors: plain loads or asynchronous copies
    into shared memory, never 2-byte scalars."""
    for kernel in ("_cam_partial_vec_kernel", "_cam_pool_vec_kernel", "_cam_bwd_vec_kernel"):
        acc = _get(rows, "vec", kernel)["global"]
        assert any(k.endswith(".128") and k.startswith(("LDG", "LDGSTS")) for k in acc), (kernel, acc)
    bwd = _get(rows, "vec", "_cam_bwd_vec_kernel")["global"]
    assert any(k.startswith("STG") and k.endswith(".128") for k in bwd), bwd


@pytest.mark.skipif(TRITON_VERSION < (3, 6),
                    reason="register budget measured with Triton 3.6 and 3.8 (91 and 80 registers; 3.2 allocates 168)")
def test_split_backward_keeps_offsets_in_32_bits(rows):
    """Offsets inside an image are int32: with int64 offsets the same kernel needed 255 registers
    (12% occupancy on an H200, matching Nsight Compute), with int32 ones about 80."""
    assert _get(rows, "split", "_cam_bwd_kernel")["regs"] <= 128


def test_vec_kernels_do_less_work_per_element_than_the_split_ones(rows):
    """SASS instructions executed per element of the map (thread-level, static estimate): the
    vec forward (partial sums + pooling) and backward each cost well under the split kernels'."""
    def ipe(variant, kernel):
        v = _get(rows, variant, kernel)["instr_per_element"]
        assert v is not None, (variant, kernel)
        return v

    split_fwd = ipe("split", "_cam_partial_kernel") + ipe("split", "_cam_pool_kernel")
    vec_fwd = ipe("vec", "_cam_partial_vec_kernel") + ipe("vec", "_cam_pool_vec_kernel")
    assert vec_fwd < 0.6 * split_fwd, (vec_fwd, split_fwd)
    assert ipe("vec", "_cam_bwd_vec_kernel") < 0.6 * ipe("split", "_cam_bwd_kernel")


def test_inter_kernels_use_the_tensor_cores_without_spilling_at_tf32(tmp_path):
    """``--inter``: the Triton inter-loss launches at the GPU configuration. With TF32 the tile
    kernels run on the tensor cores and do not spill (at 3xTF32 the backward does: see
    ``benchmarks/results/kernel_static_sm90.md``)."""
    rows = {(r["phase"], r["kernel"]): r
            for r in _static_rows(tmp_path, "--inter", "4096", "64", "128", "32", "--precision", "high")}
    for key in (("fwd", "_inter_fwd_kernel"), ("bwd", "_inter_bwd_kernel")):
        r = rows[key]
        assert r["local"] == 0, (key, r["local"])
        assert any(op in r["opcodes"] for op in ("HMMA", "HGMMA")), (key, list(r["opcodes"])[:20])


def test_bank_plan_kernel_fits_in_registers(tmp_path):
    """``--bank``: the enqueue's plan kernel compares rows in int32 tiles (int64 [64, 128] tiles
    took 255 registers and spilled 608 bytes per thread)."""
    rows = {r["kernel"]: r for r in _static_rows(tmp_path, "--bank", "1000", "16", "2048", "256")}
    assert set(rows) == {"_plan_kernel", "_class_apply_kernel", "_resync_kernel"}
    assert all(r["local"] == 0 for r in rows.values())
    assert rows["_plan_kernel"]["regs"] <= 64


def test_structure_kernels_do_not_spill(tmp_path):
    """``--structure``: the one-launch centroid kernel scans labels in [32, 128] tiles (a
    [128, 512] tile took 255 registers and spilled 400 bytes per thread)."""
    rows = {(r["phase"], r["kernel"]): r for r in _static_rows(tmp_path, "--structure", "1000", "2048", "256")}
    assert set(rows) == {("fwd", "_centroids_kernel"), ("fwd", "_intra_kernel"), ("bwd", "_intra_kernel")}
    assert all(r["local"] == 0 for r in rows.values()), {k: r["local"] for k, r in rows.items()}
    assert rows[("fwd", "_centroids_kernel")]["regs"] <= 96
