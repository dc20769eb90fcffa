"""icakd-study: Student's t, the summary's statistics, a tiny study end to end, presets."""

import csv
import json
import math

import pytest

from icakd_fast import study
from icakd_fast.train.config import load_toml, parse_args
from icakd_fast.train.errors import UserError

# two-sided 95% critical values t_{0.975, df} (standard tables)
T975 = {1: 12.7062047, 2: 4.30265273, 3: 3.18244631, 4: 2.77644511, 5: 2.57058184, 9: 2.26215716,
        10: 2.22813885, 30: 2.04227246, 100: 1.98397152}


@pytest.mark.parametrize("df,want", sorted(T975.items()))
def test_t_quantile_table(df, want):
    assert study.t_quantile(0.975, df) == pytest.approx(want, rel=1e-6)
    assert study.t_quantile(0.025, df) == pytest.approx(-want, rel=1e-6)


def test_t_distribution_closed_forms():
    # df=1 is Cauchy: F(t) = 1/2 + atan(t)/pi; df=2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert study.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-10)
        assert study.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-10)
    assert study.t_quantile(0.95, 4) == pytest.approx(2.13184679, rel=1e-6)
    assert study.t_quantile(0.5, 7) == 0.0
    with pytest.raises(ValueError):
        study.t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        study.t_quantile(0.9, 0)


def test_summarize_hand_computed():
    runs = [{"method": m, "seed": s, "top1": v, "dir": f"{m}/{s}"}
            for m, vals in {"kd": [70.0, 72.0, 74.0], "icakd": [71.0, 72.5, 76.0]}.items()
            for s, v in zip((1, 2, 3), vals)]
    out = study.summarize(runs, ["kd", "icakd"])
    assert set(out) == {"runs", "methods", "paired"}
    assert out["methods"]["kd"] == {"mean": 72.0, "sd": pytest.approx(2.0), "n": 3}
    p = out["paired"]["icakd-kd"]
    # differences 1.0, 0.5, 2.0: mean 7/6, sd sqrt(((-1/6)^2 + (-2/3)^2 + (5/6)^2) / 2)
    sd = math.sqrt(((1 / 6) ** 2 + (2 / 3) ** 2 + (5 / 6) ** 2) / 2)
    half = T975[2] * sd / math.sqrt(3)
    assert p["mean"] == pytest.approx(7 / 6) and p["sd"] == pytest.approx(sd) and p["n"] == 3
    assert p["ci95"] == pytest.approx([7 / 6 - half, 7 / 6 + half], rel=1e-6)
    # one seed: no spread, no interval
    one = study.summarize(runs[:1] + runs[3:4], ["kd", "icakd"])
    assert one["methods"]["kd"]["sd"] is None and one["paired"]["icakd-kd"]["ci95"] is None


def test_pairs_of_interest():
    pairs = study.pairs_of_interest(["ce", "kd", "cskd", "icakd", "icakd-nobank", "cskd-official"])
    assert pairs[:4] == [("icakd", "kd"), ("icakd", "cskd"), ("cskd", "kd"), ("kd", "ce")]
    assert ("icakd-nobank", "icakd") in pairs and ("icakd", "cskd-official") in pairs
    assert study.pairs_of_interest(["ce", "icakd-fifo"]) == []


def _tiny_config(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('dataset = "synthetic"\nteacher = "resnet8"\nstudent = "resnet8"\nepochs = 1\n'
                   'batch-size = 8\n[synthetic]\nnum_classes = 3\nimage_size = 16\n'
                   'train_per_class = 6\ntest_per_class = 4\n')
    return cfg


def test_tiny_study_end_to_end_and_not_redone(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["--config", str(_tiny_config(tmp_path)), "--methods", "kd,cskd-official", "--seeds", "2",
            "--teacher-epochs", "1", "--out", str(out), "--threads", "1", "--device", "cpu"]
    assert study.main(argv) == 0
    text = capsys.readouterr().out
    assert "[4/4] cskd-official seed 2" in text and "last-epoch test top-1" in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"runs", "methods", "paired"}
    assert len(summary["runs"]) == 4
    by = {}
    for r in summary["runs"]:
        with open(r["dir"] + "/metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert int(rows[-1]["epoch"]) == 1 and float(rows[-1]["test_top1"]) == r["top1"]
        by[(r["method"], r["seed"])] = r["top1"]
    diffs = [by[("cskd-official", s)] - by[("kd", s)] for s in (1, 2)]
    p = summary["paired"]["cskd-official-kd"]
    assert p["mean"] == pytest.approx(sum(diffs) / 2) and p["n"] == 2
    assert summary["methods"]["kd"]["n"] == 2
    meta = json.loads((out / "study.json").read_text())
    assert meta["statistic"].startswith("last-epoch test top-1") and set(meta["teachers"]) == {"1", "2"}
    stamp = (out / "kd" / "seed1" / "last.pt").stat().st_mtime_ns
    # run again: nothing is trained, the summary is the same
    assert study.main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("done earlier") == 6  # 2 teachers + 4 runs
    assert (out / "kd" / "seed1" / "last.pt").stat().st_mtime_ns == stamp
    assert json.loads((out / "summary.json").read_text())["paired"] == summary["paired"]
    assert "| kd | 2 |" in (out / "summary.md").read_text()
    # --collect trains nothing: an unfinished run is left out
    (out / "kd" / "seed2" / "study_run.json").unlink()
    assert study.main(argv + ["--collect"]) == 0
    assert "kd seed 2: not finished" in capsys.readouterr().out
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 3
    assert not (out / "kd" / "seed2" / "study_run.json").exists()


def test_bad_arguments(tmp_path, capsys):
    assert study.main(["--seed", "3"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert study.main(["--methods", "kd,nothing", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert study.main(["--seeds", "0"]) == 2


def test_manyclass_preset_is_shipped():
    data = load_toml("manyclass")
    assert data["synthetic"]["num_classes"] == 100 and data["batch-size"] == 64
    cfg, demo, _ = parse_args(["--config", "manyclass", "--method", "kd", "--teacher-ckpt", "x"])
    assert cfg.synthetic["num_classes"] == 100 and cfg.batch_size == 64 and not demo
    with pytest.raises(UserError, match="not found"):
        load_toml("no-such-preset")
