"""The command line as a user runs it: segment, bench (with resume), datasets."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fdseg.cli import main

CLASS = ("sd_saliency_900", "scratches")


def _pairs(root, n):
    d = root.joinpath(*CLASS)
    imgs = sorted((d / "images").iterdir())[:n]
    return [(p, d / "masks" / f"{p.stem}.png") for p in imgs]


def test_segment_folder_writes_everything_and_skips_bad_files(tmp_path, defects_root, capsys):
    pairs = _pairs(defects_root, 5)
    qdir = tmp_path / "queries"
    qdir.mkdir()
    for img, _ in pairs[1:]:
        shutil.copy(img, qdir / img.name)
    (qdir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    big = np.array(Image.open(pairs[1][0]).convert("RGB").resize((300, 260)))
    Image.fromarray(big).save(qdir / "resized.jpg")
    out = tmp_path / "out"
    rc = main(["segment", "--support", str(pairs[0][0]), str(pairs[0][1]), "--query", str(qdir),
               "--out", str(out), "--no-progress"])
    assert rc == 3                                   # finished, with a skipped file
    rows = json.loads((out / "summary.json").read_text())
    assert [r["query"] for r in rows] == sorted(p.stem for p in qdir.iterdir())
    bad = [r for r in rows if r["status"] != "ok"]
    assert len(bad) == 1 and "broken.png" in bad[0]["error"]
    for r in rows:
        if r["status"] != "ok":
            continue
        src = Image.open(r["file"])
        mask = Image.open(out / "masks" / f"{r['query']}.png")
        score = Image.open(out / "scores" / f"{r['query']}.png")
        assert mask.size == score.size == src.size == (r["width"], r["height"])
        m = np.array(mask) > 0
        assert set(np.unique(np.array(mask))) <= {0, 255}
        assert r["defect_fraction"] == pytest.approx(m.mean(), abs=1e-6)
        assert (np.array(score)[m] >= 127).all()
        assert (out / "overlays" / f"{r['query']}.jpg").is_file()
        assert len(r["boxes"]) == r["components"]
    # scratches on steel: the detector finds defects in most queries
    assert sum(r["defect_fraction"] > 0 for r in rows if r["status"] == "ok") >= 3
    with open(out / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    html = (out / "report.html").read_text()
    assert "overlays/" in html and "broken.png" in html
    assert "skipped" in capsys.readouterr().err
    assert not list(out.rglob(".*.tmp"))              # no half-written files left


def test_segment_bad_support_is_one_clear_line(tmp_path, defects_root, capsys):
    (img, _), = _pairs(defects_root, 1)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros(Image.open(img).size[::-1], np.uint8)).save(empty)
    rc = main(["segment", "--support", str(img), str(empty), "--query", str(img), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "empty.png: support mask is empty" in err and "Traceback" not in err


def test_bench_writes_tables_and_resumes(tmp_path, defects_root, monkeypatch):
    import fdseg.bench as bench
    args = ["bench", "--data", str(defects_root), "--datasets", "crackforest", "sd_saliency_900",
            "--max-per-class", "4", "--shots", "1", "--method", "fm", "proto", "--out", str(tmp_path / "b"),
            "--no-progress", "--gallery", "1"]
    calls = {"n": 0}
    real = bench.run_episode

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bench, "run_episode", flaky)
    assert main(args) == 130                         # interrupted after 6 episodes
    log = tmp_path / "b" / "runs" / "fm_1shot.jsonl"
    assert len(log.read_text().splitlines()) == 1 + 6
    calls["n"] = -1000
    assert main(args) == 0
    assert calls["n"] == -1000 + (16 - 6) + 16       # only the unfinished fm episodes and the proto run
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [(r["method"], r["shots"], r["episodes"]) for r in res["runs"]] == [("fm", 1, 16), ("proto", 1, 16)]
    for r in res["runs"]:
        assert {d["dataset"] for d in r["datasets"]} == {"crackforest", "sd_saliency_900"}
        assert 0 < r["class_mean_miou"] < 1
    for f in ("results.csv", "results.md", "report.html", "episodes_1shot.json"):
        assert (tmp_path / "b" / f).is_file()
    html = (tmp_path / "b" / "report.html").read_text()
    assert "gallery/" in html and all((tmp_path / "b" / g["path"]).is_file() for g in res["runs"][0]["gallery"])
    # other settings may not silently reuse these results
    assert main(args + ["--threshold", "0.1"]) == 2
    assert main(args + ["--colour-refine", "0"]) == 2         # the colour rule is part of the settings


def test_datasets_command(tmp_path, defects_root, capsys):
    assert main(["datasets", str(defects_root)]) == 0
    out = capsys.readouterr().out
    assert "5 datasets, 17 classes, 749 defect images" in out and "visa/capsules" in out
    bad = tmp_path / "d" / "ds" / "c"
    (bad / "images").mkdir(parents=True)
    (bad / "masks").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(bad / "images" / "a.png")
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(bad / "masks" / "a.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(bad / "images" / "b.png")
    assert main(["datasets", str(tmp_path / "d")]) == 1
    out = capsys.readouterr().out
    assert "b.png: image has no mask" in out and "a.png: mask is 20x10 but its image is 20x20" in out
