"""Tests of the trainer CLI (icakd_fast.train): smoke runs, resume, DDP, config, errors, demo."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from icakd_fast.train import TrainConfig, UserError
from icakd_fast.train.__main__ import main
from icakd_fast.train.config import build_parser, config_from_mapping, parse_args
from icakd_fast.train.models import build_model, canonical_name, model_names

REPO = Path(__file__).resolve().parents[1]

# tiny synthetic task: 4 classes, 16x16 images, 16 train / 4 test images per class
TINY = ["--num-classes", "4", "--image-size", "16", "--batch-size", "8", "--no-progress", "--threads", "2"]


def _tiny_toml(path: Path, **extra) -> Path:
    lines = ['dataset = "synthetic"', "seed = 3"]
    for k, v in extra.items():
        lines.append(f"{k} = {json.dumps(v)}")
    lines += ["[synthetic]", "num_classes = 4", "image_size = 16", "train_per_class = 16", "test_per_class = 4"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(args, capsys=None) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("teacher")
    cfg = _tiny_toml(d / "t.toml")
    rc = main(["--config", str(cfg), "--method", "ce", "--student", "resnet14", "--epochs", "1",
               "--limit-train-batches", "2", "--out", str(d / "run"), *TINY])
    assert rc == 0
    assert (d / "run" / "last.pt").is_file() and (d / "run" / "best.pt").is_file()
    return d / "run" / "best.pt"


# ----------------------------------------------------------------------------- smoke runs

@pytest.mark.parametrize("method", ["ce", "kd", "cskd", "icakd"])
def test_two_step_smoke_each_method(tmp_path, teacher_ckpt, method):
    cfg = _tiny_toml(tmp_path / "c.toml")
    out = tmp_path / "out"
    rc = _run(["--config", cfg, "--method", method, "--teacher", "resnet14", "--student", "resnet8",
               "--teacher-ckpt", teacher_ckpt, "--epochs", "1", "--limit-train-batches", "2", "--out", out, *TINY])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1 and rows[0]["step"] == "2"
    assert 0.0 <= float(rows[0]["test_top1"]) <= 100.0
    expected = {"ce": ["ce"], "kd": ["ce", "kd"], "cskd": ["ce", "kd", "intra", "inter"],
                "icakd": ["ce", "kd", "cam", "intra", "inter"]}[method]
    for part in ("ce", "kd", "cam", "intra", "inter"):
        assert (rows[0][f"loss_{part}"] != "") == (part in expected), part
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    for key in ("student", "loss_module", "optimizer", "scheduler", "scaler", "epoch", "step", "rng"):
        assert key in ck, key
    assert ck["epoch"] == 1 and ck["step"] == 2
    if method == "icakd":
        assert int(ck["loss_module"]["bank_s.count"].sum()) == 16  # 2 steps x 8 images enqueued
    if method == "ce":
        assert ck["loss_module"] is None


def test_amp_bf16_channels_last_smoke(tmp_path, teacher_ckpt):
    cfg = _tiny_toml(tmp_path / "c.toml")
    rc = _run(["--config", cfg, "--method", "icakd", "--teacher", "resnet14", "--student", "wrn16_1",
               "--teacher-ckpt", teacher_ckpt, "--epochs", "1", "--limit-train-batches", "2",
               "--amp", "bf16", "--channels-last", "--out", tmp_path / "o", *TINY])
    assert rc == 0


# ----------------------------------------------------------------------------- resume

def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_is_exact(tmp_path, teacher_ckpt):
    cfg = _tiny_toml(tmp_path / "c.toml")
    common = ["--config", cfg, "--method", "icakd", "--teacher", "resnet14", "--student", "resnet8",
              "--teacher-ckpt", teacher_ckpt, "--limit-train-batches", "3", "--workers", "0",
              "--schedule", "multistep", "--milestones", "1", *TINY]
    assert _run([*common, "--epochs", "2", "--out", tmp_path / "straight"]) == 0
    assert _run([*common, "--epochs", "1", "--out", tmp_path / "split"]) == 0
    assert _run([*common, "--epochs", "2", "--out", tmp_path / "split", "--resume"]) == 0
    a, b = _state(tmp_path / "straight" / "last.pt"), _state(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 6
    for part in ("student", "loss_module"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_resume_from_explicit_path_and_finished_run(tmp_path):
    cfg = _tiny_toml(tmp_path / "c.toml")
    common = ["--config", cfg, "--method", "ce", "--limit-train-batches", "1", "--epochs", "1", *TINY]
    assert _run([*common, "--out", tmp_path / "a"]) == 0
    # already finished: nothing to train, still exits cleanly
    assert _run([*common, "--out", tmp_path / "b", "--resume", tmp_path / "a"]) == 0


# ----------------------------------------------------------------------------- distributed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_process_gloo(tmp_path, teacher_ckpt):
    cfg = _tiny_toml(tmp_path / "c.toml")
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "icakd_fast.train", "--config", str(cfg), "--method", "icakd", "--teacher", "resnet14",
           "--student", "resnet8", "--teacher-ckpt", str(teacher_ckpt), "--epochs", "1",
           "--limit-train-batches", "2", "--out", str(out), "--loss-opt", "slots_per_class=64",
           "--device", "cpu", *TINY[:-2], "--threads", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 2
    # the bank gathered both ranks' batches: 2 steps x 8 images x 2 ranks
    assert int(ck["loss_module"]["bank_s.count"].sum()) == 32
    assert int(ck["loss_module"]["bank_t.count"].sum()) == 32
    assert len(ck["rng"]) == 2
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1  # rank 0 only
    assert proc.stdout.count("epoch 1/1:") == 1


# ----------------------------------------------------------------------------- config and CLI

def test_help_documents_every_flag(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--data-dir", "--download", "--method", "--teacher", "--student", "--teacher-ckpt",
                 "--epochs", "--batch-size", "--lr", "--seed", "--device", "--out", "--resume",
                 "--limit-train-batches", "--amp", "--channels-last", "--compile", "--workers", "--config"):
        assert flag in text, flag


def test_config_file_and_cli_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('dataset = "cifar100"\ndata-dir = "/data/cifar"\nmethod = "kd"\nepochs = 240\n'
                 'batch_size = 64\nlr = 0.05\nschedule = "multistep"\nmilestones = [150, 180, 210]\n'
                 'teacher = "resnet56"\nstudent = "resnet20"\n[loss]\nw_cam = 50\nbank = "fifo"\n')
    cfg, demo, given = parse_args(["--config", str(f), "--lr", "0.1", "--epochs", "3", "--loss-opt", "tau=2",
                                   "--amp", "bf16"])
    assert not demo
    assert (cfg.dataset, cfg.data_dir, cfg.method) == ("cifar100", "/data/cifar", "kd")
    assert cfg.lr == 0.1 and cfg.epochs == 3 and cfg.batch_size == 64 and cfg.amp == "bf16"
    assert cfg.milestones == [150.0, 180.0, 210.0] and cfg.schedule == "multistep"
    assert cfg.loss == {"w_cam": 50, "bank": "fifo", "tau": 2}
    assert "lr" in given and "batch_size" not in given


def test_no_arguments_means_demo():
    cfg, demo, _ = parse_args([])
    assert demo and cfg == TrainConfig()
    assert parse_args(["--out", "x", "--epochs", "1"])[1]
    assert not parse_args(["--method", "ce"])[1]
    assert parse_args(["--demo", "--method", "ce"])[1]


def test_config_rejects_unknown_keys_and_bad_types():
    with pytest.raises(UserError, match="unknown key 'epoch'"):
        config_from_mapping({"epoch": 3})
    with pytest.raises(UserError, match="must be an integer"):
        config_from_mapping({"epochs": "3"})
    with pytest.raises(UserError, match="must be a number"):
        config_from_mapping({"lr": "fast"})
    with pytest.raises(UserError, match="unknown method"):
        config_from_mapping({"method": "fitnet"}).validate()


def test_repository_configs_parse():
    files = sorted((REPO / "configs").glob("*.toml"))
    assert len(files) >= 5
    for f in files:
        cfg, demo, _ = parse_args(["--config", str(f)])
        assert not demo
        canonical_name(cfg.student)
        canonical_name(cfg.teacher)
        assert cfg.dataset in ("cifar10", "cifar100", "tiny-imagenet", "imagenet")


@pytest.mark.parametrize("args, needle", [
    (["--config", "/nonexistent/x.toml"], "config file not found"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--method", "ce", "--student", "resnet9000"], "unknown model 'resnet9000'"),
    (["--method", "kd", "--teacher-ckpt", "/nonexistent/t.pt"], "teacher checkpoint not found"),
    (["--method", "kd"], "needs --teacher-ckpt"),
    (["--dataset", "cifar10", "--method", "ce"], "--data-dir is required"),
    (["--dataset", "cifar100", "--data-dir", "/nonexistent/cifar", "--method", "ce"], "data directory not found"),
    (["--dataset", "imagenet", "--data-dir", "/tmp", "--method", "ce"], "not found"),
    (["--method", "ce", "--resume", "/nonexistent/last.pt"], "resume checkpoint not found"),
    (["--method", "ce", "--device", "tpu9"], "device"),
    (["--method", "ce", "--epochs", "0"], "epochs must be >= 1"),
    (["--amp", "fp8"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, args, needle):
    rc = main([*args, "--out", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0, err
    assert err.startswith("icakd-train: error: ") and needle in err, err
    assert "Traceback" not in err


def test_bad_input_exit_code_via_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "icakd_fast.train", "--dataset", "cifar10", "--data-dir",
                           str(tmp_path / "missing"), "--method", "ce"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"icakd-train: error: data directory not found: {tmp_path / 'missing'}"]


def test_wrong_teacher_checkpoint_is_a_clear_error(tmp_path, capsys, teacher_ckpt):
    cfg = _tiny_toml(tmp_path / "c.toml")
    rc = main(["--config", str(cfg), "--method", "kd", "--teacher", "resnet8x4", "--teacher-ckpt",
               str(teacher_ckpt), "--out", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "resnet14, not a resnet8x4" in err and "\n" not in err


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("name", [n for n in model_names() if not n.startswith(("resnet18", "resnet34", "resnet50",
                                                                                  "mobilenet"))])
def test_cifar_models_follow_the_tap_layout(name):
    from icakd_fast.hooks import FeatureTap

    if name in ("resnet110",):
        pytest.skip("same code path as resnet56, just deeper")
    torch.manual_seed(0)
    m = build_model(name, 7).eval()
    with FeatureTap(m) as tap:
        z = m(torch.randn(2, 3, 16, 16))
        assert z.shape == (2, 7)
        assert tap.features.dim() == 4 and tap.features.shape[1] == m.fc.in_features
        assert (tap.features >= 0).all()  # post-activation
        pooled = tap.features.mean((2, 3))
        assert torch.allclose(m.fc(pooled), z, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_build_and_tap(name):
    pytest.importorskip("torchvision")
    from icakd_fast.hooks import FeatureTap

    m = build_model(name, 5).eval()
    with FeatureTap(m) as tap:
        z = m(torch.randn(1, 3, 32, 32))
        assert z.shape == (1, 5)
        assert tap.features.shape[1] == tap.fc_weight.shape[1]


def test_model_name_spellings():
    assert canonical_name("WRN-40-2") == "wrn40_2"
    assert canonical_name("wrn_16_2") == "wrn16_2"
    assert canonical_name("MobileNetV2") == "mobilenet_v2"
    with pytest.raises(KeyError):
        canonical_name("vgg8")


# ----------------------------------------------------------------------------- demo

def test_demo_tiny_writes_everything_and_caches_teacher(tmp_path, capsys, monkeypatch):
    from icakd_fast.train.demo import run_demo

    args = ["--out", str(tmp_path / "demo"), "--epochs", "1", "--limit-train-batches", "2", "--teacher", "resnet14",
            *TINY]
    cfg, demo, given = parse_args(args)
    assert demo
    cfg.synthetic.update(train_per_class=16, test_per_class=4)
    summary = run_demo(cfg, given)
    out = capsys.readouterr().out
    assert set(summary["methods"]) == {"ce", "kd", "cskd", "icakd"}
    for name, r in summary["methods"].items():
        assert 0.0 <= r["top1"] <= 100.0 and r["images_per_s"] > 0, name
        assert f"{name} -> resnet8" in out
    assert "top-1" in out and "images/s" in out and "peak mem" in out
    assert {"device", "versions", "teacher"} <= set(summary)
    on_disk = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert on_disk["methods"].keys() == summary["methods"].keys()
    rows = list(csv.DictReader(open(tmp_path / "demo" / "metrics.csv")))
    assert sorted({r["method"] for r in rows}) == ["ce", "cskd", "icakd", "kd"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (tmp_path / "demo" / "cams.png").stat().st_size > 1000
        assert (tmp_path / "demo" / "curves.png").stat().st_size > 1000
    # second run: the teacher comes from the cache; without matplotlib the figures are skipped
    import icakd_fast.train.plots as plots

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    summary2 = run_demo(cfg, given)
    captured = capsys.readouterr()
    assert "using the cached teacher" in captured.out
    assert captured.err.count("matplotlib is not installed") == 1 and summary2["figures"] == []
    # same seed, same budget, same cached teacher: the same result
    assert summary2["methods"]["icakd"]["top1"] == summary["methods"]["icakd"]["top1"]


@pytest.mark.slow
def test_compile_smoke(tmp_path, teacher_ckpt):
    cfg = _tiny_toml(tmp_path / "c.toml")
    rc = _run(["--config", cfg, "--method", "icakd", "--teacher", "resnet14", "--student", "resnet8",
               "--teacher-ckpt", teacher_ckpt, "--epochs", "1", "--limit-train-batches", "2", "--compile",
               "--out", tmp_path / "o", *TINY])
    assert rc == 0


def test_entry_point_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'icakd-train = "icakd_fast.train.__main__:main"' in text
    assert build_parser().prog == "icakd-train"


def test_teacher_checkpoint_with_other_class_count_is_a_clear_error(tmp_path, capsys, teacher_ckpt):
    cfg = _tiny_toml(tmp_path / "c.toml")
    rc = main(["--config", str(cfg), "--method", "kd", "--teacher", "resnet14", "--teacher-ckpt", str(teacher_ckpt),
               "--out", str(tmp_path / "o"), *TINY, "--num-classes", "5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "weights do not fit resnet14" in err and "\n" not in err


def test_corrupt_resume_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"garbage")
    rc = main(["--method", "ce", "--resume", str(bad), "--out", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot read checkpoint" in err and "\n" not in err
