"""Faults in the trainer: bad steps, preemption signals, elastic restarts, bad or unsafe checkpoints.

Every run is tiny (4 classes, 16x16 synthetic images, 8 images per batch) and on the CPU.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from icakd_fast.train import TrainConfig
from icakd_fast.train import engine
from icakd_fast.train.__main__ import main
from icakd_fast.train.data import build_datasets
from icakd_fast.train.errors import TrainingStopped
from icakd_fast.train.models import build_model

REPO = Path(__file__).resolve().parents[1]
SYN = {"num_classes": 4, "image_size": 16, "train_per_class": 16, "test_per_class": 4}  # 64 train images
SPE = 8  # steps per epoch at batch 8
TINY = ["--dataset", "synthetic", "--seed", "3", "--num-classes", "4", "--image-size", "16", "--batch-size", "8",
        "--no-progress", "--threads", "1", "--workers", "0"]
SYN_ARGS = ["--loss-opt", "slots_per_class=16"]


CONF: Path | None = None  # the tiny synthetic set for the command line (written by _tiny_config)


@pytest.fixture(scope="module", autouse=True)
def _tiny_config(tmp_path_factory):
    global CONF
    CONF = tmp_path_factory.mktemp("conf") / "tiny.toml"
    CONF.write_text("[synthetic]\n" + "".join(f"{k} = {v}\n" for k, v in SYN.items()))


def _cli(*args) -> int:
    return main(["--config", str(CONF), *[str(a) for a in args]])


def _cfg(out: Path, **kw) -> TrainConfig:
    base = TrainConfig(dataset="synthetic", method="ce", student="resnet8", epochs=2, batch_size=8, seed=3,
                       device="cpu", out=str(out), progress=False, workers=0, threads=1, synthetic=dict(SYN))
    return replace(base, **kw)


def _bundle():
    return build_datasets("synthetic", seed=3, synthetic=dict(SYN))


class _Faulty(Dataset):
    """The wrapped dataset, except: the samples in ``nan`` are all-NaN images, and the
    ``signal_at``-th read (1-based) sends ``signum`` to this process."""

    def __init__(self, base, *, nan=(), signal_at: int | None = None, signum=signal.SIGTERM):
        self.base, self.nan, self.signal_at, self.signum, self.reads = base, set(nan), signal_at, signum, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.signal_at:
            os.kill(os.getpid(), self.signum)
        x, y = self.base[i]
        return (torch.full_like(x, float("nan")) if i in self.nan else x), y


def _with_train(bundle, **kw):
    return replace(bundle, train=_Faulty(bundle.train, **kw))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _assert_same_state(a: dict, b: dict) -> None:
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for part in ("student", "loss_module"):
        if a[part] is None:
            assert b[part] is None
            continue
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]), f"momentum {k} differs"
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("teacher")
    assert _cli("--method", "ce", "--student", "resnet14", "--epochs", "1", "--limit-train-batches", "2",
                "--out", d, *TINY) == 0
    return d / "best.pt"


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory) -> Path:
    """A finished 1-epoch ce run of resnet8 (its last.pt is at step 8)."""
    d = tmp_path_factory.mktemp("ce_run")
    assert _cli("--method", "ce", "--student", "resnet8", "--epochs", "1", "--out", d, *TINY) == 0
    return d


# ----------------------------------------------------------------------------- preemption

def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path, teacher_ckpt):
    bundle = _bundle()
    cfg = _cfg(tmp_path / "x", method="icakd", teacher="resnet14", teacher_ckpt=str(teacher_ckpt),
               loss={"slots_per_class": 16})
    straight = engine.train(replace(cfg, out=str(tmp_path / "straight")), data=bundle, log=lambda m: None)
    assert straight["stopped"] is None and straight["steps"] == 2 * SPE
    # SIGTERM arrives while batch 4 of epoch 2 (global step 12) is being loaded
    lines: list[str] = []
    with pytest.raises(TrainingStopped) as stopped:
        engine.train(replace(cfg, out=str(tmp_path / "split")), log=lines.append,
                     data=_with_train(bundle, signal_at=(SPE + 3) * 8 + 1))
    assert stopped.value.signal_name == "SIGTERM" and stopped.value.summary["steps"] == SPE + 4
    said = [ln for ln in lines if "SIGTERM" in ln]
    assert len(said) == 1 and "stopped at step 12 (epoch 2, batch 4/8)" in said[0], lines
    mid = _load(tmp_path / "split" / "last.pt")
    assert (mid["epoch"], mid["step"], mid["batch"]) == (1, SPE + 4, 4)
    assert len(_rows(tmp_path / "split")) == 1  # the interrupted epoch has no row yet
    lines.clear()
    resumed = engine.train(replace(cfg, out=str(tmp_path / "split"), resume="auto"), data=bundle, log=lines.append)
    assert resumed["stopped"] is None
    assert any("resumed from" in ln and "batch 4/8 of epoch 2" in ln for ln in lines), lines
    a, b = _load(tmp_path / "straight" / "last.pt"), _load(tmp_path / "split" / "last.pt")
    _assert_same_state(a, b)
    ra, rb = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["epoch"] for r in rb] == ["1", "2"]
    for key in ("step", "train_loss", "train_top1", "loss_cam", "test_top1", "test_loss", "bad_steps"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key


def test_sigint_via_cli_exits_130_and_resume_finishes(tmp_path, monkeypatch, capsys):
    bundle = _bundle()
    monkeypatch.setattr(engine, "build_datasets",
                        lambda *a, **k: _with_train(bundle, signal_at=2 * 8 + 1, signum=signal.SIGINT))
    out = tmp_path / "o"
    assert _cli("--method", "ce", "--epochs", "1", "--out", out, *TINY) == 130
    text = capsys.readouterr().out
    assert text.count("SIGINT received") == 1 and "stopped at step 3 (epoch 1, batch 3/8)" in text
    assert "done:" not in text
    assert _load(out / "last.pt")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the trainer's handler is gone
    monkeypatch.setattr(engine, "build_datasets", lambda *a, **k: bundle)
    assert _cli("--method", "ce", "--epochs", "1", "--out", out, "--resume", *TINY) == 0
    assert "resumed from" in capsys.readouterr().out
    ck = _load(out / "last.pt")
    assert (ck["epoch"], ck["step"], ck["batch"]) == (1, SPE, 0)


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    out = tmp_path / "fresh"
    assert _cli("--method", "ce", "--epochs", "1", "--limit-train-batches", "2", "--out", out, "--resume",
                "--save-every", "1", *TINY) == 0
    text = capsys.readouterr().out
    assert "no checkpoint in" in text and "starting fresh" in text
    assert _load(out / "last.pt")["step"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_save_is_atomic(tmp_path):
    path = tmp_path / "last.pt"
    engine._save({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed while saving")

    with pytest.raises(RuntimeError, match="killed while saving"):
        engine._save({"step": 2, "w": torch.zeros(1000), "x": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


# ----------------------------------------------------------------------------- bad steps

def test_bad_steps_change_nothing(tmp_path):
    """Every step non-finite (and never stopping): the student is exactly its initialisation."""
    bundle = _bundle()
    nan_all = _with_train(bundle, nan=range(len(bundle.train)))
    lines: list[str] = []
    s = engine.train(_cfg(tmp_path, epochs=1, limit_train_batches=3, max_bad_steps=0), data=nan_all,
                     log=lines.append)
    assert s["bad_steps"] == 3 and s["steps"] == 3
    assert sum("non-finite loss, optimiser step skipped" in ln for ln in lines) == 3
    torch.manual_seed(3)
    init = build_model("resnet8", 4).state_dict()
    ck = _load(tmp_path / "last.pt")
    for k, v in init.items():  # weights and BatchNorm statistics alike
        assert torch.equal(ck["student"][k], v), k
    assert ck["optimizer"]["state"] == {}  # no optimiser step was ever taken
    assert _rows(tmp_path)[0]["bad_steps"] == "3"


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_one_bad_batch_is_skipped_and_counted(tmp_path, teacher_ckpt, amp):
    if amp == "fp16":
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
        except RuntimeError:
            pytest.skip("no float16 autocast on this CPU build")
    bundle = _bundle()
    method = "icakd" if amp == "off" else "ce"
    cfg = _cfg(tmp_path, method=method, teacher="resnet14", teacher_ckpt=str(teacher_ckpt), amp=amp,
               loss={"slots_per_class": 16} if method == "icakd" else {})
    s = engine.train(cfg, data=_with_train(bundle, nan=[5]), log=lambda m: None)  # sample 5: once per epoch
    assert s["stopped"] is None and s["steps"] == 2 * SPE and s["bad_steps"] == 2
    rows = _rows(tmp_path)
    assert [r["bad_steps"] for r in rows] == ["1", "1"]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("train_loss", "test_loss"))
    ck = _load(tmp_path / "last.pt")
    for part in ("student", "loss_module"):
        for k, v in (ck[part] or {}).items():
            if v.is_floating_point():
                assert torch.isfinite(v).all(), f"{part}.{k}"
    if method == "icakd":
        assert int(rows[-1]["refused_rows"]) > 0  # the NaN rows were refused by the banks
    if amp == "fp16":
        # the scaler never saw the skipped steps (an update after a non-finite step would halve it)
        assert ck["scaler"]["scale"] >= 65536.0


def test_consecutive_bad_steps_stop_with_intact_checkpoint(tmp_path, ce_run, monkeypatch, capsys):
    out = tmp_path / "o"
    shutil.copytree(ce_run, out)
    good = _load(out / "last.pt")
    bundle = _bundle()
    monkeypatch.setattr(engine, "build_datasets", lambda *a, **k: _with_train(bundle, nan=range(len(bundle.train))))
    rc = _cli("--method", "ce", "--epochs", "2", "--out", out, "--resume", "--max-bad-steps", "3",
              "--save-every", "1", *TINY)
    err = capsys.readouterr().err.strip()
    assert rc == 3 and "\n" not in err, err
    assert "stopped after 3 consecutive steps with a non-finite loss" in err and "(steps 9-11" in err, err
    after = _load(out / "last.pt")  # readable, and holds the weights of the last good step
    assert f"holds the weights of step {SPE}" in err, err
    for k, v in good["student"].items():
        assert torch.equal(after["student"][k], v), k


# ----------------------------------------------------------------------------- bad checkpoints

@pytest.mark.parametrize("args, needle", [
    (["--method", "ce", "--student", "wrn16_1"], "saved with student 'resnet8', this run has 'wrn16_1'"),
    (["--method", "ce", "--student", "resnet8", "--num-classes", "5"], "saved with 4 classes, this run's dataset has 5"),
    (["--method", "kd", "--teacher", "resnet14"], "saved with method 'ce', this run has 'kd'"),
    (["--method", "ce", "--loss-opt", "w_cam=7"], "saved with loss option w_cam unset, this run has w_cam=7"),
])
def test_resume_from_another_configuration_is_refused(tmp_path, ce_run, teacher_ckpt, capsys, args, needle):
    out = tmp_path / "o"
    shutil.copytree(ce_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc = _cli(*TINY, *args, "--teacher-ckpt", teacher_ckpt, "--epochs", "2", "--out", out, "--resume")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and needle in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten


def test_truncated_and_unfitting_checkpoints_are_refused(tmp_path, ce_run, capsys):
    out = tmp_path / "o"
    shutil.copytree(ce_run, out)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _cli("--method", "ce", "--epochs", "2", "--out", out, "--resume", *TINY) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read checkpoint: truncated or corrupt file" in err and "\n" not in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # same names, other shapes: the student does not fit
    ck = _load(ce_run / "last.pt")
    ck["student"]["fc.weight"] = torch.zeros(4, 7)
    engine._save(ck, out / "last.pt")
    assert _cli("--method", "ce", "--epochs", "2", "--out", out, "--resume", *TINY) == 2
    err = capsys.readouterr().err.strip()
    assert "the student does not fit this run" in err and "fc.weight" in err and "\n" not in err, err


class _RunsCode:
    """Unpickling this calls open(marker, 'w'): the marker file shows that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_needs_code_is_refused_and_runs_nothing(tmp_path, ce_run, teacher_ckpt, capsys):
    marker = tmp_path / "code_ran"
    evil = _load(teacher_ckpt)
    evil["extra"] = _RunsCode(marker)
    bad = tmp_path / "bad.pt"
    torch.save(evil, bad)
    runs = [["--method", "kd", "--teacher", "resnet14", "--teacher-ckpt", bad, "--out", tmp_path / "a"],
            ["--method", "ce", "--resume", bad, "--out", tmp_path / "b"]]
    for args in runs:
        assert _cli(*TINY, *args) == 2
        err = capsys.readouterr().err.strip()
        assert "refused: loading it would unpickle" in err and "open" in err and "\n" not in err, err
    with pytest.raises(Exception, match="refused"):
        engine.load_weights(build_model("resnet14", 4), str(bad), "resnet14")
    assert not marker.exists()
    # the file does run code when unpickled without weights_only: the test above could fail
    torch.load(bad, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_types(ce_run):
    def walk(v, where):
        if isinstance(v, dict):
            for k, x in v.items():
                assert isinstance(k, (str, int)), where
                walk(x, f"{where}.{k}")
        elif isinstance(v, (list, tuple)):
            for j, x in enumerate(v):
                walk(x, f"{where}[{j}]")
        else:
            assert v is None or isinstance(v, (torch.Tensor, bool, int, float, str)), (where, type(v))

    for name in ("last.pt", "best.pt"):
        walk(torch.load(ce_run / name, map_location="cpu", weights_only=True), name)


# ----------------------------------------------------------------------------- distributed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _workers(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the trainer processes torchrun started."""
    found = {}
    for task in Path(f"/proc/{agent_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(pid)
    return found


def _saved_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - not written yet
        return 0


def test_elastic_restart_after_sigkill_is_bit_identical(tmp_path, teacher_ckpt):
    """torchrun --max-restarts 1: rank 0 is SIGKILLed mid-run, the workers restart with --resume and the
    run ends with the same state as one never broken (gloo, CPU)."""
    epochs, spe = 2, 4  # 64 images, 2 ranks, batch 8
    total = epochs * spe

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--max-restarts", "1", "--monitor-interval", "0.1", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), "-m", "icakd_fast.train", "--config", str(CONF), *TINY[:-4], "--threads", "1",
                "--workers", "0", "--method", "icakd", "--teacher", "resnet14", "--student", "resnet8",
                "--teacher-ckpt", str(teacher_ckpt), "--epochs", str(epochs), "--device", "cpu",
                *SYN_ARGS, "--save-every", "1", "--out", str(out), "--resume"]

    straight = subprocess.run(cmd(tmp_path / "straight"), env=_env(), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    assert "starting fresh" in straight.stdout

    out = tmp_path / "broken"
    proc = subprocess.Popen(cmd(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while killed_at is None and time.monotonic() < deadline and proc.poll() is None:
            step = _saved_step(out / "last.pt")
            if step >= 2:
                os.kill(_workers(proc.pid)[0], signal.SIGKILL)
                killed_at = step
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None and killed_at < total, "the run ended before the kill"
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    resumed = [ln for ln in stdout.splitlines() if "resumed from" in ln]
    assert len(resumed) == 1, stdout[-3000:]
    step = int(resumed[0].split("step ")[1].split(",")[0].split()[0])
    assert killed_at <= step < total, resumed
    a, b = _load(tmp_path / "straight" / "last.pt"), _load(out / "last.pt")
    assert a["step"] == b["step"] == total and len(a["rng"]) == len(b["rng"]) == 2
    _assert_same_state(a, b)
    assert [r["train_loss"] for r in _rows(tmp_path / "straight")] == [r["train_loss"] for r in _rows(out)]


_ONE_RANK_NAN = """
import sys
from dataclasses import replace
sys.path.insert(0, {tests!r})
from test_train_faults import _Faulty, _bundle, _cfg
from icakd_fast.train.engine import train

bundle = _bundle()
summary = train(_cfg({out!r}, epochs=1, threads=1), data=replace(bundle, train=_Faulty(bundle.train, nan=[5])))
assert summary["bad_steps"] == 1, summary["bad_steps"]
"""


def test_ddp_bad_step_on_one_rank_is_skipped_on_all(tmp_path):
    """Sample 5 (NaN) is in one rank's shard: both ranks skip that step, and say so once."""
    script = tmp_path / "one_rank_nan.py"
    script.write_text(_ONE_RANK_NAN.format(tests=str(Path(__file__).parent), out=str(tmp_path / "o")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script)],
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = [ln for ln in proc.stdout.splitlines() if "optimiser step skipped" in ln]
    assert len(said) == 1 and "non-finite loss on 1 of 2 ranks" in said[0], proc.stdout[-3000:]
    assert [r["bad_steps"] for r in _rows(tmp_path / "o")] == ["1"]
    ck = _load(tmp_path / "o" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ck["student"].values() if v.is_floating_point())
