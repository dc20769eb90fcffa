"""The scripts in examples/ run as written (few steps, so that CI stays quick)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("TRITON_INTERPRET", None)  # as a user runs them (the test session sets it without CUDA)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_drop_in_example_trains():
    out = _run("drop_in.py", "--steps", "3", "--batch-size", "16", "--device", "cpu")
    steps = re.findall(r"^step +\d+ +loss (\S+) +\((.*)\)$", out, re.M)
    assert len(steps) == 3, out
    for total, parts in steps:
        named = dict(re.findall(r"(\w+) (\S+)", parts))
        assert set(named) == {"ce", "kd", "cam", "intra", "inter"}, parts
        assert math.isfinite(float(total)) and float(total) > 0
        assert all(math.isfinite(float(v)) and float(v) >= 0 for v in named.values())
    # 3 batches of 16 random labels over 10 classes reach every class but with tiny odds
    m = re.search(r"done on cpu: 3 steps; the teacher bank holds samples of (\d+) of 10 classes", out)
    assert m and 1 <= int(m.group(1)) <= 10, out


def test_torchvision_pair_example_runs_every_method():
    pytest.importorskip("torchvision")
    out = _run("torchvision_pair.py", "--steps", "1", "--batch-size", "4", "--image-size", "32",
               "--device", "cpu")
    rows = re.findall(r"^(\w+) +last loss +(\S+) +\((.*?)\)", out, re.M)
    assert [r[0] for r in rows] == ["ce", "kd", "cskd", "icakd"], out
    terms = {name: set(re.findall(r"(\w+) [-\d.]+", parts)) for name, _, parts in rows}
    assert terms == {"ce": {"ce"}, "kd": {"ce", "kd"}, "cskd": {"ce", "kd", "intra", "inter"},
                     "icakd": {"ce", "kd", "cam", "intra", "inter"}}, out
    assert all(math.isfinite(float(v)) for _, v, _ in rows)
    # ResNets at 32x32 end in a 1x1 map, taken from layer4
    assert "(4, 512, 1, 1) from 'layer4'" in out, out
