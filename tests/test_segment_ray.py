"""``fdseg segment --engine ray``: a local Ray (2 CPUs, loopback) against the single-machine path.

One Ray instance serves the module (starting Ray costs ~10-20 s here); every Ray run uses
it through ``ray.is_initialized()``, as a user's driver script inside a cluster would.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fdseg
from fdseg.cli import main

# before Ray is imported: no usage stats, and a single-node Ray whose servers listen on loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

SCRATCHES = ("sd_saliency_900", "scratches")
TILES = ("magnetic_tile", "blowhole")


def _images(root, cls, n, skip=0):
    d = root.joinpath(*cls)
    return sorted((d / "images").iterdir())[skip:skip + n]


@pytest.fixture(scope="module")
def ray_local():
    try:
        import ray
    except ImportError:
        pytest.fail("ray is not installed: `make install` installs the 'ray' extra (pip install -e '.[dev,ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """The actors run one torch thread each (--cpus-per-actor 1): so does the local reference."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def support(defects_root):
    img = _images(defects_root, SCRATCHES, 1)[0]
    return img, img.parent.parent / "masks" / f"{img.stem}.png"


@pytest.fixture(scope="module")
def demo_support(demo):
    return demo.supports[0]


def _fitted(support):
    return fdseg.FewShotSegmenter().fit([support[0]], [support[1]])


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.data
@pytest.mark.slow
def test_ray_cli_matches_local_path_image_for_image(ray_local, defects_root, support, tmp_path, one_thread, capsys):
    q = tmp_path / "queries"
    (q / "sub").mkdir(parents=True)
    for p in _images(defects_root, SCRATCHES, 5, skip=1) + _images(defects_root, TILES, 3):
        shutil.copy(p, q / p.name)                    # two datasets: 200x200 PNG and odd-sized JPEG
    shutil.copy(_images(defects_root, SCRATCHES, 1, skip=2)[0], q / "sub")   # same stem -> STEM_1
    (q / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    args = ["segment", "--support", str(support[0]), str(support[1]), "--query", str(q), str(q / "sub"),
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "local")]) == 3
    assert main(args + ["--out", str(tmp_path / "ray"), "--engine", "ray", "--ray-batch-size", "2"]) == 3
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err
    local, ray_out = _files(tmp_path / "local"), _files(tmp_path / "ray")
    for kind in ("masks/", "scores/", "overlays/"):
        names = sorted(k for k in local if k.startswith(kind))
        assert len(names) == 9 and names == sorted(k for k in ray_out if k.startswith(kind))
        assert all(local[k] == ray_out[k] for k in names), f"{kind} differ"   # byte for byte
    rows = json.loads(ray_out["summary.json"])
    assert rows == json.loads(local["summary.json"])
    assert any(r["query"].endswith("_1") for r in rows)          # the repeated stem got its own files
    bad = [r for r in rows if r["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["file"] == str(q / "broken.png") and "broken.png" in bad[0]["error"]
    assert sum(r["defect_fraction"] > 0 for r in rows if r["status"] == "ok") >= 5
    import pyarrow.parquet as pq
    table = pq.read_table(tmp_path / "ray" / "summary.parquet")
    assert table.column_names == fdseg.segment_folder.FIELDS
    assert table.to_pylist() == rows
    assert "overlays/" in ray_out["report.html"].decode() and not list((tmp_path / "ray").rglob(".*.tmp"))


@pytest.mark.data
@pytest.mark.slow
def test_ray_with_an_inspector_ships_its_bytes_and_matches_the_local_path(ray_local, defects_root, support,
                                                                          tmp_path, one_thread, monkeypatch):
    """`fdseg fit --out F` then `segment --engine ray --inspector F`: the actors get the file's bytes (no
    pickled segmenter) and write the masks `segment --support` writes locally, byte for byte."""
    from fdseg import segment_ray as sr
    q = tmp_path / "queries"
    q.mkdir()
    for p in _images(defects_root, SCRATCHES, 3, skip=1):
        shutil.copy(p, q / p.name)
    insp = tmp_path / "line.fdseg"
    assert main(["fit", "--support", str(support[0]), str(support[1]), "--preset", "fast", "--out", str(insp)]) == 0
    shipped = []
    real = sr.ship_payload
    monkeypatch.setattr(sr, "ship_payload", lambda seg, inspector=None: shipped.append(real(seg, inspector))
                        or shipped[-1])
    assert main(["segment", "--inspector", str(insp), "--query", str(q), "--out", str(tmp_path / "ray"),
                 "--engine", "ray", "--no-progress"]) == 0
    assert list(shipped[0]) == ["inspector"] and shipped[0]["inspector"] == insp.read_bytes()
    assert main(["segment", "--support", str(support[0]), str(support[1]), "--preset", "fast", "--query", str(q),
                 "--out", str(tmp_path / "local"), "--no-progress"]) == 0
    local, ray_out = _files(tmp_path / "local"), _files(tmp_path / "ray")
    masks = sorted(k for k in local if k.startswith("masks/"))
    assert len(masks) == 3 and all(local[k] == ray_out[k] for k in masks)


@pytest.mark.data
@pytest.mark.slow
def test_ray_interrupted_run_resumes_without_recomputing(ray_local, defects_root, support, tmp_path, monkeypatch):
    from fdseg import segment_ray as sr
    seg = _fitted(support)
    queries = _images(defects_root, SCRATCHES, 10, skip=1)
    out = tmp_path / "out"
    real, calls = sr.RowLog.append, {"n": 0}

    def interrupted(self, rows):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt               # Ctrl-C after two batches reached the driver
        real(self, rows)

    monkeypatch.setattr(sr.RowLog, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sr.segment_ray(seg, queries, out, actors=2, batch_size=2, progress=False)
    assert ray_local.is_initialized()             # the caller's Ray is left running
    first = [json.loads(ln) for ln in (out / "summary.jsonl").read_text().splitlines()]
    assert len(first) == 4 and all(r["status"] == "ok" for r in first)
    stamps = {r["query"]: (out / "masks" / f"{r['query']}.png").stat().st_mtime_ns for r in first}
    monkeypatch.setattr(sr.RowLog, "append", real)

    res = sr.segment_ray(seg, queries, out, actors=2, batch_size=2, progress=False, resume=True)
    assert res.computed == len(queries) - 4       # only the unfinished queries went to the actors
    assert [r["query"] for r in res.rows] == [p.stem for p in queries] and not res.errors
    assert {q: (out / "masks" / f"{q}.png").stat().st_mtime_ns for q in stamps} == stamps   # not rewritten
    assert len((out / "summary.jsonl").read_text().splitlines()) == len(queries)
    again = sr.segment_ray(seg, queries, out, resume=True, progress=False)
    assert again.computed == 0 and again.rows == res.rows
    # the local engine resumes the same folder: nothing left to do, same rows
    from fdseg.segment_folder import segment_folder
    assert segment_folder(seg, queries, out, resume=True, progress=False).rows == res.rows


@pytest.mark.data
@pytest.mark.slow
def test_ray_reads_and_writes_through_pyarrow_filesystems(ray_local, defects_root, support, tmp_path, one_thread):
    """file:// goes through pyarrow.fs exactly as s3:// or gs:// would (listing, reading, object writes)."""
    from fdseg.segment_folder import collect_queries, segment_folder
    from fdseg.segment_ray import segment_ray
    seg = _fitted(support)
    q = tmp_path / "q"
    q.mkdir()
    for p in _images(defects_root, TILES, 3, skip=3):
        shutil.copy(p, q / p.name)
    (q / "notes.txt").write_text("not an image")
    res = segment_ray(seg, [f"file://{q}/"], f"file://{tmp_path}/out", actors=1, progress=False)
    assert res.computed == 3 and [r["file"] for r in res.rows] == [f"file://{p}" for p in sorted(q.glob("*.jpg"))]
    out = tmp_path / "out"
    assert len(list((out / "summary.parts").iterdir())) == 1
    import pyarrow.parquet as pq
    assert pq.read_table(out / "summary.parquet").to_pylist() == res.rows
    local = segment_folder(seg, collect_queries([q]), tmp_path / "local", progress=False)
    for r in local.rows:
        assert (out / "masks" / f"{r['query']}.png").read_bytes() == \
            (tmp_path / "local" / "masks" / f"{r['query']}.png").read_bytes()
    assert segment_ray(seg, [f"file://{q}/*.jpg"], f"file://{out}", resume=True, progress=False).computed == 0
    assert not list(out.rglob(".*.tmp"))


# -- no Ray needed -----------------------------------------------------------------------------------
def test_the_shipped_payload_is_an_inspector_file_and_loads_to_the_same_predictions(demo, tmp_path):
    """What the driver ships to the actors: inspector bytes (and a user weights file's bytes), not a pickle;
    what an actor loads from them predicts what the driver's fit does."""
    from fdseg.backbones import create_backbone
    from fdseg.segment_ray import load_shipped, ship_payload
    (s_img, s_mask), (q, _) = demo.supports[0], demo.queries[0]
    seg = fdseg.FewShotSegmenter(preset="fast").fit([s_img], [s_mask])
    payload = ship_payload(seg)
    assert list(payload) == ["inspector"] and payload["inspector"][8:9] == b"{"      # safetensors header
    actor = load_shipped(payload)
    assert np.array_equal(actor.predict(q).mask, seg.predict(q).mask)
    # a backbone built from a user's weights file: the file's bytes travel too (the workers need not have it)
    w = tmp_path / "lite0.pth"
    torch.save(create_backbone("efficientnet_lite0").state_dict(), w)
    seg_w = fdseg.FewShotSegmenter(preset="fast", weights=w).fit([s_img], [s_mask])
    payload = ship_payload(seg_w)
    assert payload["weights"] == w.read_bytes() and payload["weights_suffix"] == ".pth"
    w.unlink()
    assert np.array_equal(load_shipped(payload).predict(q).mask, seg_w.predict(q).mask)


def test_core_never_imports_ray():
    code = ("import sys, fdseg, fdseg.cli, fdseg.segment_ray, fdseg.store; "
            "fdseg.cli.build_parser().parse_args(['segment', '--support', 'a', 'b', '--query', 'q', '--out', 'o', "
            "'--engine', 'ray']); print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_extra_is_one_clear_line(monkeypatch, demo_support, tmp_path, capsys):
    support = demo_support
    monkeypatch.setitem(sys.modules, "ray", None)          # as if fdseg[ray] were not installed
    rc = main(["segment", "--support", str(support[0]), str(support[1]), "--query", str(support[0]),
               "--out", str(tmp_path / "o"), "--engine", "ray"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'fdseg[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_output_store_local_and_pyarrow(tmp_path):
    from fdseg.store import OutputStore
    for out in (tmp_path / "a", f"file://{tmp_path}/b"):
        st = OutputStore(out)
        assert st.read_text("x/y.txt") is None and st.list("x") == []
        st.write_text("x/y.txt", "one")
        st.write_bytes("x/y.txt", b"two")                   # replaces
        st.write_text("x/z.txt", "three")
        assert st.read_text("x/y.txt") == "two" and st.list("x") == ["y.txt", "z.txt"]
        import pickle
        assert pickle.loads(pickle.dumps(st)).read_text("x/z.txt") == "three"
    assert sorted(p.name for p in (tmp_path / "b" / "x").iterdir()) == ["y.txt", "z.txt"]   # no temp files


def test_list_queries_uri_folder_glob_and_errors(tmp_path):
    from fdseg.errors import InputError
    from fdseg.segment_ray import list_queries
    for n in ("b.png", "a.jpg", ".hidden.png", "c.txt"):
        (tmp_path / n).write_bytes(b"x")
    ql = list_queries([f"file://{tmp_path}"])
    assert ql.files == [f"file://{tmp_path}/a.jpg", f"file://{tmp_path}/b.png"]
    assert ql.read_paths == [f"{tmp_path}/a.jpg", f"{tmp_path}/b.png"]
    globbed = [f"file://{tmp_path}/.hidden.png", f"file://{tmp_path}/b.png"]   # a glob takes what it matches,
    assert list_queries([f"file://{tmp_path}/*.png"]).files == globbed             # as the local engine's does
    assert list_queries([str(tmp_path / "*.png")]).files == [u[len("file://"):] for u in globbed]
    assert list_queries([str(tmp_path)]).read_paths == [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]
    twice = list_queries([str(tmp_path / "b.png"), str(tmp_path), f"{tmp_path}/./b.png"])
    assert twice.files == [str(tmp_path / "b.png"), str(tmp_path / "a.jpg")]         # b.png once
    with pytest.raises(InputError, match="does not exist"):
        list_queries([f"file://{tmp_path}/nope"])
    with pytest.raises(InputError, match="all local paths or all URIs"):
        list_queries([str(tmp_path), f"file://{tmp_path}"])


def test_fitted_segmenter_moves_and_pickles_unchanged(demo_support, demo):
    import pickle
    seg = fdseg.FewShotSegmenter(preset="fast").fit([demo_support[0]], [demo_support[1]])   # one view: cheap
    q = demo.queries[0][0]
    ref = seg.predict(q)
    moved = pickle.loads(pickle.dumps(seg)).to("cpu")      # what an actor gets
    assert moved.device.type == "cpu" and moved.method.fg.device.type == "cpu"
    p = moved.predict(q)
    assert np.array_equal(p.mask, ref.mask) and np.array_equal(p.score, ref.score)
    with open(q, "rb") as f:                               # encoded bytes, as Ray Data reads them
        b = moved.predict(f.read())
    assert np.array_equal(b.mask, ref.mask)
    with pytest.raises(fdseg.InputError, match="corrupt|readable|cannot open"):
        moved.predict(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)


def test_actors_that_can_never_be_placed(capsys):
    from fdseg.errors import InputError
    from fdseg.segment_ray import _check_resources
    with pytest.raises(InputError, match="--gpus-per-actor.*1 GPUs but the Ray cluster has 0"):
        _check_resources({"CPU": 2.0}, 1, 1, local=True)          # the local Ray fdseg started: refuse
    _check_resources({"CPU": 2.0}, 4, 0, local=False)            # a cluster may autoscale: warn
    assert "4 CPUs but the Ray cluster has 2" in capsys.readouterr().err
    _check_resources({"CPU": 2.0, "GPU": 1.0}, 1, 0.5, local=True)
