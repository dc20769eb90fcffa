"""Smoke tests of benchmarks/e2e_bench.py (dry run: CPU, tiny shapes, Triton interpreter) and
benchmarks/plot_results.py on its output."""

import json
import os
import subprocess
import sys

import pytest

from icakd_fast import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "e2e_bench.py")
PLOT = os.path.join(ROOT, "benchmarks", "plot_results.py")
METHODS = {"ce", "kd", "cskd", "icakd"}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")


def _run(args, out, timeout):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, BENCH, "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "e2e_bench.json").read_text())
    assert (out / "e2e_bench.csv").is_file()
    return data, proc.stdout


def _check_rows(data, presets):
    env, rows = data["environment"], data["results"]
    for key in ("device_name", "torch", "triton", "cuda", "memory_measure"):
        assert key in env
    for r in rows:
        for key in ("case", "backend", "method", "shape", "metric", "value", "unit", "status"):
            assert key in r, r
    for preset in presets:
        e2e = [r for r in rows if r["mode"] == "e2e" and r["preset"] == preset]
        assert METHODS <= {r["method"] for r in e2e if r["metric"] == "images_per_s"}, preset
        ok = {r["method"] for r in e2e if r["metric"] == "images_per_s" and r["status"] == "ok"}
        assert METHODS <= ok, [(r["method"], r["backend"], r["status"]) for r in e2e if r["status"] != "ok"]
    for r in rows:
        if r["backend"] in ("reference", "cpp"):
            assert not r["status"].startswith("error"), r
            assert r["status"] != "mismatch", r
    return rows


def _plot(path, out_png):
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, PLOT, str(path), "--out", str(out_png)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out_png.stat().st_size > 10_000


def test_e2e_bench_dry_run_cifar_sweep_peers(tmp_path):
    """Fast subset: CIFAR preset (all backends but compiled), sweep, peers, then the plot."""
    data, stdout = _run(["--dry-run", "--preset", "cifar", "--sweep", "--peers", "--no-compile"], tmp_path, 240)
    rows = _check_rows(data, ["cifar"])
    assert any(r["mode"] == "sweep" and r["metric"] == "ms" and r["status"] == "ok" for r in rows)
    assert any(r["mode"] == "peers" for r in rows)
    assert any(r["metric"] == "icakd_step_time_ratio_vs_kd" for r in rows)
    assert "images/s" in stdout  # the summary table
    triton = [r for r in rows if r["backend"] == "triton" and r["mode"] in ("e2e", "sweep")]
    if data["environment"]["triton_backend"] == "available":
        assert triton and all(r["status"] in ("ok",) for r in triton), triton
    _plot(tmp_path / "e2e_bench.json", tmp_path / "plot.png")


def test_e2e_bench_budget_skips(tmp_path):
    """With no time left every task is recorded as skipped, and the files are still written."""
    data, _ = _run(["--dry-run", "--preset", "cifar", "--sweep", "--budget-s", "0.001"], tmp_path, 120)
    rows = data["results"]
    assert rows and all(r["status"].startswith("skipped") for r in rows if r["mode"] in ("e2e", "sweep"))
    assert any("budget" in r["status"] for r in rows)


@pytest.mark.slow
def test_e2e_bench_dry_run_everything(tmp_path):
    """Every mode and preset, compiled rows included (about 2 minutes on 2 CPU cores)."""
    data, _ = _run(["--dry-run"], tmp_path, 900)
    rows = _check_rows(data, ["imagenet", "cifar"])
    compiled = [r for r in rows if r["backend"] == "compiled" and r["metric"] in ("images_per_s", "ms")]
    assert compiled and all(r["status"] == "ok" or r["status"].startswith(("error", "skipped")) for r in compiled)
    _plot(tmp_path / "e2e_bench.json", tmp_path / "plot.png")


def test_e2e_bench_memory_mode_reports_kd_and_icakd_peaks(tmp_path):
    """--memory: the step peak memory of KD and ICAKD per backend and their difference."""
    data, _ = _run(["--dry-run", "--memory", "--preset", "cifar", "--backends", "reference,cpp"], tmp_path, 240)
    rows = data["results"]
    assert not any(r["mode"] == "e2e" for r in rows)
    for backend in ("reference", "cpp"):
        peaks = {r["method"]: r["value"] for r in rows
                 if r["metric"] == "step_peak_above_start_mib" and r["backend"] == backend}
        if backend == "cpp" and not peaks:
            continue  # extension not built
        assert set(peaks) == {"kd", "icakd"} and all(v > 0 for v in peaks.values()), (backend, peaks)
        diff = [r for r in rows if r["metric"] == "step_peak_icakd_minus_kd_mib" and r["backend"] == backend]
        assert len(diff) == 1 and abs(diff[0]["value"] - (peaks["icakd"] - peaks["kd"])) < 1e-6
    text = (tmp_path / "e2e_bench.memory_cifar.txt").read_text()
    assert "step peak" in text and "icakd backend=reference" in text


def test_live_at_peak_replays_an_allocator_trace():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import e2e_bench
    finally:
        sys.path.pop(0)
    here = {"filename": "/x/icakd_fast/loss.py", "line": 7, "name": "forward"}
    other = {"filename": "/x/torch/nn/functional.py", "line": 3, "name": "linear"}
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": [other, here]},
        {"action": "alloc", "addr": 2, "size": 50, "frames": [other]},
        {"action": "free_requested", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "alloc", "addr": 3, "size": 70, "frames": [here]},  # peak: 170 (1 and 3 alive)
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "free_requested", "addr": 99, "size": 10},  # allocated before the trace: ignored
        {"action": "alloc", "addr": 4, "size": 20, "frames": []},
    ]
    peak, alive = e2e_bench.live_at_peak(trace)
    assert peak == 170 and sorted(a["addr"] for a in alive) == [1, 3]
    sites = e2e_bench.group_by_site(alive)
    assert sites == [("loss.py:7 (forward)", 170, 2)]


def test_host_profile_dry_run_times_and_profiles_every_backend(tmp_path):
    """The host-time profiler runs every op on every backend that can run it on CPU."""
    script = os.path.join(ROOT, "benchmarks", "host_profile.py")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "host_profile.txt").read_text()
    assert text.count("====") == 3
    for backend in ("reference", "cpp") if _ext.load() else ("reference",):
        assert text.count(f"---- {backend}: cProfile") == 3, backend
    assert "us/call" in text and "ncalls" in text


def test_inter_incremental_bench_small(tmp_path):
    """The incremental-inter benchmark at tiny shapes: both forms agree and the Gram matrix kept
    up to date equals a rebuild."""
    script = os.path.join(ROOT, "benchmarks", "inter_incremental_bench.py")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--name", "t", "--device", "cpu",
                           "--classes", "64", "--teacher-dim", "8", "--student-dim", "6", "--batch", "12",
                           "--slots", "2", "--steps", "2", "--backend", "reference"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["classes"] == 64 and data["full_form_backend"] == "reference"
    assert set(data["step_ms_median"]) == {"incremental", "full", "kd"}
    assert data["inter_loss_rel_diff"] < 1e-5
    assert data["gram_drift_after_steps"] < 1e-12
    assert "| ICAKD, incremental inter loss |" in (tmp_path / "t.md").read_text()


def _step_bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import step_bench
    finally:
        sys.path.pop(0)
    return step_bench


def test_step_bench_op_counter_counts_top_level_ops():
    """The dispatch mode counts each op it sees once: 3 forward ops, 2 backward ones here."""
    sb = _step_bench()
    import torch
    x = torch.randn(4, 3, requires_grad=True)
    with sb.OpCounter() as fwd:
        y = (x * 2 + 1).sum()
    assert dict(fwd.counts) == {"aten.mul": 1, "aten.add": 1, "aten.sum": 1}
    with sb.OpCounter() as bwd:
        y.backward()
    assert x.grad is not None and sum(bwd.counts.values()) >= 2 and "aten.mul" in bwd.counts


def test_step_bench_small(tmp_path):
    """Every method x backend x mode is in the results: reference and cpp measured (ops counted in
    eager, ICAKD dispatching more ops than KD), triton skipped on CPU with the reason."""
    script = os.path.join(ROOT, "benchmarks", "step_bench.py")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--shape", "10,8,4,2", "--steps", "3",
                           "--warmup", "1", "--threads", "1", "--compile-backend", "eager",
                           "--out", str(tmp_path), "--name", "t"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["shape"] == {"C": 10, "B": 8, "D": 4, "H": 2} and data["device_type"] == "cpu"
    rows = {(r["method"], r["backend"], r["mode"]): r for r in data["configs"]}
    backends = ("reference", "cpp", "triton")
    assert set(rows) == {(m, b, mode) for m in METHODS for b in backends for mode in ("eager", "compiled")}
    measured = ("reference", "cpp") if _ext.load() else ("reference",)
    for (m, b, mode), r in rows.items():
        if b == "triton":
            assert r["status"].startswith("skipped") and "interpreter" in r["status"], r["status"]
            continue
        if b not in measured:
            continue
        assert r["status"] == "ok", (m, b, mode, r["status"])
        assert r["timed_steps"] == 3 and r["us_median"] > 0 and r["cpu_us_median"] > 0
        if mode == "eager":
            assert isinstance(r["ops"], int) and not isinstance(r["ops"], bool) and r["ops"] > 0, r["ops"]
            assert sum(r["ops_by_name"].values()) == r["ops"]
        else:
            assert r["ops"] is None and r["compile_s"] > 0
    for b in measured:
        assert rows["icakd", b, "eager"]["ops"] > rows["kd", b, "eager"]["ops"] > rows["ce", b, "eager"]["ops"], b
        ratio = [r for r in data["icakd_over_kd"] if r["backend"] == b and r["mode"] == "eager"]
        assert len(ratio) == 1
        assert ratio[0]["ops"] == rows["icakd", b, "eager"]["ops"] / rows["kd", b, "eager"]["ops"]
    text = (tmp_path / "t.md").read_text()
    assert "| method | backend | ops (eager) |" in text and "ICAKD / KD" in text
