"""The command line as a user runs it: segment, bench (with resume), datasets."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fdseg.cli import main
from fdseg.metrics import benchmark_mean, dataset_scores

from conftest import iou

# three of the demo's blowhole queries and one defect-free tile, segmented with --preset fast (one view of
# the support and of each query: 2.5 x faster than the default here); IoU with their ground truth measured
# 0.69, 0.52, 0.66 (the default preset: 0.68, 0.39, 0.65), and nothing found on the free tile
DEMO_QUERIES = ("exp1_num_108889", "exp1_num_297464", "exp1_num_317483")


def test_segment_folder_writes_everything_and_skips_bad_files(tmp_path, demo, capsys):
    (s_img, s_mask), gts = demo.supports[0], {p.stem: g for p, g in demo.queries}
    qdir = tmp_path / "queries"
    qdir.mkdir()
    for img, _ in demo.queries:
        if img.stem in DEMO_QUERIES:
            shutil.copy(img, qdir / img.name)
    shutil.copy(demo.free[0], qdir / demo.free[0].name)
    (qdir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    first = qdir / f"{DEMO_QUERIES[0]}.jpg"
    Image.open(first).convert("RGB").resize((300, 260)).save(qdir / "resized.jpg")
    out = tmp_path / "out"
    rc = main(["segment", "--support", str(s_img), str(s_mask), "--query", str(qdir),
               "--out", str(out), "--no-progress", "--preset", "fast"])
    assert rc == 3                                   # finished, with a skipped file
    rows = json.loads((out / "summary.json").read_text())
    assert [r["query"] for r in rows] == sorted(p.stem for p in qdir.iterdir())
    bad = [r for r in rows if r["status"] != "ok"]
    assert len(bad) == 1 and "broken.png" in bad[0]["error"]
    ious = {}
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
        assert (np.array(score)[m] >= 127).all() and (np.array(score)[~m] < 128).all()
        overlay = Image.open(out / "overlays" / f"{r['query']}.jpg")
        assert overlay.size == src.size and overlay.mode == "RGB"
        assert len(r["boxes"]) == r["components"]
        if r["query"] in gts:
            ious[r["query"]] = iou(m, np.array(Image.open(gts[r["query"]])) > 0)
    # the blowholes are found where the ground truth has them; the defect-free tile stays clean
    assert sorted(ious) == sorted(DEMO_QUERIES)
    assert min(ious.values()) > 0.3 and np.mean(list(ious.values())) > 0.5, ious
    assert next(r for r in rows if r["query"] == demo.free[0].stem)["defect_fraction"] < 0.005
    assert next(r for r in rows if r["query"] == "resized")["defect_fraction"] > 0
    with open(out / "summary.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [c["query"] for c in csv_rows] == [r["query"] for r in rows]
    assert [c["status"] for c in csv_rows] == [r["status"] for r in rows]
    html = (out / "report.html").read_text()
    assert "overlays/" in html and "broken.png" in html
    assert "skipped" in capsys.readouterr().err
    assert not list(out.rglob(".*.tmp"))              # no half-written files left


def test_segment_bad_support_is_one_clear_line(tmp_path, demo, capsys):
    img = demo.supports[0][0]
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros(Image.open(img).size[::-1], np.uint8)).save(empty)
    rc = main(["segment", "--support", str(img), str(empty), "--query", str(img), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "empty.png: support mask is empty" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "masks").exists()


@pytest.mark.data
@pytest.mark.slow
def test_bench_writes_tables_and_resumes(tmp_path, defects_root, monkeypatch):
    import fdseg.bench as bench
    args = ["bench", "--data", str(defects_root), "--datasets", "crackforest", "sd_saliency_900",
            "--max-per-class", "4", "--shots", "1", "--method", "fm", "proto", "--out", str(tmp_path / "b"),
            "--no-progress", "--gallery", "1", "--preset", "fast"]   # one view: 2.5 x faster
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
    classes = {"crackforest": ["crack"], "sd_saliency_900": ["inclusion", "patches", "scratches"]}
    for r in res["runs"]:
        assert {d["dataset"] for d in r["datasets"]} == set(classes)
        # the table is the logged episodes' (the interrupted run's included), and it beats predicting
        # every pixel as defect on the same episodes
        recs = [json.loads(ln) for ln in (tmp_path / "b" / "runs" / f"{r['method']}_1shot.jsonl").read_text()
                .splitlines()[1:]]
        assert len(recs) == 16 and len({x["id"] for x in recs}) == 16

        def mean(rs):
            return benchmark_mean([dataset_scores(ds, cs, [x for x in rs if x["dataset"] == ds])
                                   for ds, cs in classes.items()])["class_mean_miou"]
        all_fg = [{**x, "tp": x["tp"] + x["fn"], "fp": x["fp"] + x["tn"], "fn": 0, "tn": 0} for x in recs]
        assert r["class_mean_miou"] == pytest.approx(mean(recs), abs=1e-9)
        assert r["class_mean_miou"] > mean(all_fg) + 0.1, (r["method"], r["class_mean_miou"], mean(all_fg))
    with open(tmp_path / "b" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(x["method"], x["dataset"]) for x in table] == \
        [(m, ds) for m in ("fm", "proto") for ds in [*classes, "class mean"]]
    means = {x["method"]: float(x["miou"]) for x in table if x["dataset"] == "class mean"}
    assert means == {r["method"]: pytest.approx(r["class_mean_miou"]) for r in res["runs"]}
    md = (tmp_path / "b" / "results.md").read_text()
    assert f"{100 * res['runs'][0]['class_mean_miou']:.1f}" in md
    from fdseg.hardware import describe_cpu, resolve_precision
    path = resolve_precision()[0]                    # the numeric path in use, named in every output
    assert {r["precision"] for r in res["runs"]} == {path} and res["cpu"] == describe_cpu()
    assert f"Numeric path: {path}" in md and f"<td>{path}</td>" in (tmp_path / "b" / "report.html").read_text()
    eps = json.loads((tmp_path / "b" / "episodes_1shot.json").read_text())
    assert len(eps["episodes"]) == 16
    html = (tmp_path / "b" / "report.html").read_text()
    gallery = res["runs"][0]["gallery"]
    assert gallery and all(g["path"] in html for g in gallery)
    for g in gallery:                          # support, query, truth and prediction side by side
        panel = Image.open(tmp_path / "b" / g["path"])
        assert panel.format == "JPEG" and panel.width > 2 * panel.height
    # other settings may not silently reuse these results
    assert main(args + ["--threshold", "0.1"]) == 2
    assert main(args + ["--colour-refine", "0"]) == 2         # the colour rule is part of the settings


@pytest.mark.data
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
