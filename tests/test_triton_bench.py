"""The GPU benchmark script's code paths, exercised on CPU through the interpreter (no timing)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
@pytest.mark.skipif(
    __import__("torch").cuda.is_available(),
    reason="the dry run targets the CPU interpreter of the CI machines; on a GPU the real benchmark runs",
)
def test_gpu_bench_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_bench.py"), "--out", str(tmp_path), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = data["results"]
    assert (tmp_path / "gpu_bench.csv").exists()
    cases = {r["case"].split(" ")[0] for r in rows}
    assert {"cam_fwd_bwd", "bank_enqueue", "centroids+intra", "inter"} <= cases
    for r in rows:
        if r["provider"] == "triton":
            assert r["status"] == "ok", r
            assert r.get("rel_err", 0) < 1e-2, r
