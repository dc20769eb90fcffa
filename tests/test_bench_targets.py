"""benchmarks/targets.py on the committed H200 results (CPU only: it reads JSON)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "targets.py")
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _rows(text):
    """{target: [threshold, provider, figure, met, others]} of the markdown table."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("target", "---"):
            out[cells[0]] = cells[1:]
    return out


def _run(*files, extra=()):
    proc = subprocess.run([sys.executable, SCRIPT, *files, *extra], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_targets_of_the_committed_h200_runs(tmp_path):
    out = tmp_path / "targets.md"
    text = _run(os.path.join(RESULTS, "gpu_bench_H200_run5.json"),
                os.path.join(RESULTS, "gpu_bench_H200_run7_inter.json"), extra=("--out", str(out)))
    assert out.read_text().strip() == text.strip()
    assert "NVIDIA H200" in text
    rows = _rows(text)
    assert rows["CAM fwd+bwd vs eager"][1:4] == ["cpp", "2.55x", "**no**"]
    assert rows["CAM fwd+bwd vs torch.compile"][1:4] == ["cpp", "1.85x", "yes"]
    assert rows["CAM fwd+bwd, share of copy bandwidth (op)"][3] == "**no**"
    assert rows["bank enqueue + sums vs eager, CUDA-graph capturable"][1:4] == ["cpp", "6.67x", "yes"]
    assert rows["bank enqueue: no host synchronisation (triton)"][3] == "yes"
    # run7 replaced run5's cpp row (the Gram form keeping its Gram matrix: 470 -> 167 MB)
    speed = rows["inter fwd+bwd, full float32, vs eager (providers within 256 MB extra)"]
    assert speed[3] == "**no**" and "tf32" not in speed[1] + speed[4] and "cpp_chunk2e24" not in speed[1] + speed[4]
    assert rows["inter fwd+bwd, full float32, extra peak memory"][1:4] == ["triton", "43 MB", "yes"]
    assert rows["CAM fwd+bwd vs eager, both in CUDA graphs"][2] == "not measured"


def test_a_missing_case_reads_not_measured_and_a_met_target_yes(tmp_path):
    res = {"environment": {"gpu": "test card", "copy_bandwidth_gbps": 1000.0},
           "results": [{"case": "cam_fwd_bwd B=256 K=2048 7x7 bfloat16", "provider": p, "status": "ok",
                        "fraction_of_copy_bw": f, "speedup_vs_eager": s, "speedup_vs_compiled": c}
                       for p, f, s, c in (("eager", 0.1, 1.0, 0.5), ("triton", 0.8, 8.0, 4.0),
                                          ("cpp", 0.5, 5.0, 2.5))]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    rows = _rows(_run(str(path)))
    assert rows["CAM fwd+bwd, share of copy bandwidth (op)"][1:5] == ["triton", "80.0%", "yes", "cpp 50.0%"]
    assert rows["CAM fwd+bwd vs eager"][1:4] == ["triton", "8.00x", "yes"]
    assert rows["bank enqueue + sums vs eager, CUDA-graph capturable"][2] == "not measured"


def test_unreadable_results_are_an_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, SCRIPT, str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "cannot read the results" in proc.stderr
