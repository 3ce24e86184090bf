"""The inspector file (fdseg/inspector.py): save a fitted segmenter, load it elsewhere, the same masks;
hostile and broken files give one clean error line (exit 2), never a traceback, never code run."""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fdseg
from fdseg import inspector
from fdseg.cli import main
from fdseg.errors import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def same_prediction(a, b) -> None:
    """Byte for byte: mask, margin grid, defect score, verdict, boxes, score map."""
    assert a.mask.dtype == b.mask.dtype and a.mask.tobytes() == b.mask.tobytes()
    assert a.margin_grid.dtype == b.margin_grid.dtype and a.margin_grid.tobytes() == b.margin_grid.tobytes()
    assert a.defect_score == b.defect_score and a.is_defective == b.is_defective
    assert a.boxes == b.boxes
    assert a.score.tobytes() == b.score.tobytes()


@pytest.fixture(scope="module")
def fitted(demo, tmp_path_factory):
    """A fast-preset fit on the demo's first support, saved (with its support images)."""
    torch.set_num_threads(1)
    seg = fdseg.FewShotSegmenter(preset="fast").fit([demo.supports[0][0]], [demo.supports[0][1]])
    path = tmp_path_factory.mktemp("insp") / "line3.fdseg"
    seg.save(path, include_supports=True, supports=[demo.supports[0]])
    return seg, path


def error_of(path: Path) -> str:
    """The one line ``fdseg inspect`` prints for a bad file (asserting exit 2 and a single line)."""
    r = subprocess.run([sys.executable, "-m", "fdseg", "inspect", str(path)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"fdseg: error: {path}: "), lines[0]
    return lines[0]


def load_error(path: Path, **kw) -> str:
    with pytest.raises(InputError) as e:
        fdseg.load(path, **kw)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    return msg


def parts(path: Path) -> tuple[dict, bytes]:
    """An inspector file -> (its header JSON, the bytes after the header)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def assemble(path: Path, header: dict, data: bytes, rehash: bool = True) -> Path:
    """Write a file in the safetensors layout by hand; ``rehash``: the content hash made right again (what
    a hostile author can always do: the hash is integrity, not a signature)."""
    meta = header["__metadata__"]
    if rehash:
        meta["sha256"] = hashlib.sha256(meta["fdseg"].encode() + data).hexdigest()
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


# -- round trip -----------------------------------------------------------------------------------------

def test_saved_and_loaded_predicts_the_same_bytes(fitted, demo):
    seg, path = fitted
    loaded = fdseg.load(path)
    assert isinstance(loaded, fdseg.FewShotSegmenter)
    assert loaded.settings == seg.settings
    assert loaded.plan == seg.plan and str(loaded.plan) == str(seg.plan)
    assert loaded.state.feature_tag == seg.state.feature_tag
    assert loaded.state.post.threshold == seg.state.post.threshold
    for name in ("fg", "bg", "head_w"):
        a, b = getattr(seg.state.method, name), getattr(loaded.state.method, name)
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert loaded.state.method.dtype == seg.state.method.dtype
    assert np.array_equal(loaded.state.colour.table, seg.state.colour.table)
    assert loaded.state.colour.table.dtype == np.float64 and loaded.state.post.colour is loaded.state.colour
    for q, _ in demo.queries[:3]:
        same_prediction(seg.predict(q), loaded.predict(q))
    # the file is plain safetensors to other readers
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("method.fg"), seg.state.method.fg)
        assert f.metadata()["format"] == "fdseg-inspector" and f.metadata()["format_version"] == "1"


def test_the_support_images_come_back_for_a_refit(fitted, demo):
    from fdseg.data.images import load_image, load_mask
    seg, path = fitted
    insp = inspector.read(path)
    assert insp.has_supports
    (name, rgb, mask), = insp.supports()
    assert name == demo.supports[0][0].name
    assert np.array_equal(rgb, load_image(demo.supports[0][0]))
    assert np.array_equal(mask, load_mask(demo.supports[0][1], size=rgb.shape[:2]))
    again = fdseg.FewShotSegmenter(**seg.settings).fit([rgb], [mask])
    same_prediction(seg.predict(demo.queries[0][0]), again.predict(demo.queries[0][0]))
    with pytest.raises(InputError, match="does not keep its support images"):
        seg.save(path.with_name("x.fdseg"), include_supports=True)


def test_describe_lists_what_the_file_holds(fitted):
    seg, path = fitted
    info = inspector.describe(path)
    assert info["format_version"] == 1 and info["fdseg_version"] == fdseg.__version__
    assert info["precision"] == seg.settings["precision"]
    assert info["backbone"]["name"] == "efficientnet_lite0"
    assert re.fullmatch(r"[0-9a-f]{64}", info["backbone"]["weights_sha256"])
    assert info["weights_here"] == "same" and info["supports_included"]
    assert info["tensors"]["method.fg"]["shape"] == list(seg.state.method.fg.shape)
    assert info["tensors"]["colour.table"] == {"dtype": "float64", "kind": "numpy", "shape": [8], "bytes": 64}
    assert [d["step"] for d in info["plan"]] == [d.step for d in seg.plan.decisions]


def test_proto_round_trip(demo, tmp_path):
    seg = fdseg.FewShotSegmenter(method="proto", preset="fast").fit([demo.supports[0][0]], [demo.supports[0][1]])
    loaded = fdseg.load(seg.save(tmp_path / "p.fdseg"))
    same_prediction(seg.predict(demo.queries[0][0]), loaded.predict(demo.queries[0][0]))


def test_a_numeric_path_other_than_the_recorded_one_warns_once(fitted, demo):
    seg, path = fitted
    other = "fp32" if seg.settings["precision"] == "bf16" else "bf16"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fdseg.load(path, precision=other)
    msgs = [str(w.message) for w in caught if issubclass(w.category, inspector.InspectorPrecisionWarning)]
    assert len(msgs) == 1, msgs
    assert f"FDSEG_PRECISION={seg.settings['precision']}" in msgs[0] and "may differ slightly" in msgs[0]
    assert loaded.settings["precision"] == other and loaded.plan["precision"] == other
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fdseg.load(path, precision=seg.settings["precision"])      # the recorded path: no warning


def test_what_cannot_be_saved_says_so(demo, tmp_path):
    from fdseg.methods import Method, register_method

    @register_method("test_inspector_net", summary="a matcher holding a network (test)")
    class NetMethod(Method):
        def fit(self, supports, normals=None):
            self.net = torch.nn.Linear(2, 2)

        def score(self, query):
            return torch.zeros(query.features.shape[-2:])

    sup = ([demo.supports[0][0]], [demo.supports[0][1]])
    seg = fdseg.FewShotSegmenter(method="test_inspector_net", preset="fast").fit(*sup)
    with pytest.raises(InputError, match="method test_inspector_net cannot be saved to an inspector file"):
        seg.save(tmp_path / "n.fdseg")
    assert not (tmp_path / "n.fdseg").exists() and not list(tmp_path.iterdir())     # nothing half-written
    with pytest.raises(InputError, match="fit the segmenter before saving"):
        fdseg.FewShotSegmenter(preset="fast").save(tmp_path / "u.fdseg")
    seg = fdseg.FewShotSegmenter(preset="fast", weights="random").fit(*sup)
    with pytest.raises(InputError, match="random"):
        seg.save(tmp_path / "r.fdseg")


def test_source_has_no_unsafe_reader():
    src = (REPO / "fdseg" / "inspector.py").read_text()
    for word in ("pickle", "torch.load", "eval(", "exec(", "importlib", "__import__", "getattr(sys.modules"):
        assert word not in src, word


# -- broken and hostile files ---------------------------------------------------------------------------

def test_truncated_files(fitted, tmp_path):
    _, path = fitted
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    for cut in (4, 8 + n // 2, 8 + n + 10, len(raw) - 1):
        bad = tmp_path / f"cut{cut}.fdseg"
        bad.write_bytes(raw[:cut])
        msg = load_error(bad)
        assert "truncated" in msg, msg
    assert "truncated" in error_of(tmp_path / f"cut{len(raw) - 1}.fdseg")


def test_a_flipped_byte_anywhere_is_caught(fitted, tmp_path):
    _, path = fitted
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    spots = sorted(set(np.linspace(0, len(raw) - 1, 41).astype(int).tolist())         # over the file
                   | set(np.linspace(0, 8 + n - 1, 81).astype(int).tolist())           # over the header
                   | {8 + n + 3, len(raw) - 1})
    for i in spots:
        # every bit of the byte (not UTF-8 any more in the header), and the next ASCII character (the
        # header still JSON: the content hash or the table checks catch it)
        for byte in (raw[i] ^ 0xFF, (raw[i] + 1) % 128 if raw[i] < 128 else raw[i] ^ 1):
            bad = tmp_path / "flip.fdseg"
            flipped = bytearray(raw)
            flipped[i] = byte
            bad.write_bytes(bytes(flipped))
            msg = load_error(bad)
            if i >= 8 + n:                       # in the tensor bytes: the content hash
                assert "content hash mismatch" in msg, (i, msg)
    assert "content hash mismatch" in error_of(bad)


def test_a_newer_format_is_refused(fitted, tmp_path):
    _, path = fitted
    header, data = parts(path)
    header["__metadata__"]["format_version"] = "2"
    bad = assemble(tmp_path / "v2.fdseg", header, data)
    assert "made by a newer fdseg: format 2 > 1" in load_error(bad)
    assert "made by a newer fdseg: format 2 > 1" in error_of(bad)


def test_an_unknown_required_section_is_refused(fitted, tmp_path):
    _, path = fitted
    header, data = parts(path)
    doc = json.loads(header["__metadata__"]["fdseg"])
    doc["sections"]["rejects_bin"] = {"first_pass": 1}          # a section a later fdseg might write
    header["__metadata__"]["fdseg"] = json.dumps(doc)
    bad = assemble(tmp_path / "s.fdseg", header, data)
    assert "section(s) rejects_bin unknown to this fdseg" in load_error(bad)


def test_other_backbone_weights_are_refused(demo, tmp_path):
    from fdseg.inspector import weights_file
    shipped, _ = weights_file("efficientnet_lite0", None)
    mine = tmp_path / "lite0.pth"
    mine.write_bytes(shipped.read_bytes())
    seg = fdseg.FewShotSegmenter(preset="fast", weights=mine).fit([demo.supports[0][0]], [demo.supports[0][1]])
    path = seg.save(tmp_path / "w.fdseg")
    assert inspector.describe(path)["backbone"]["weights_file"] == str(mine)
    fdseg.load(path)                                         # the same file: fine
    moved = tmp_path / "elsewhere.pth"
    mine.rename(moved)
    assert "is missing on this machine" in load_error(path)
    fdseg.load(path, weights=moved)                          # told where it is now: fine
    with open(moved, "ab") as f:
        f.write(b"\0")                                       # other weights
    msg = load_error(path, weights=moved)
    assert "has sha256" in msg and "other weights give other features" in msg


@pytest.fixture()
def not_inspectors(tmp_path, demo) -> dict[str, tuple[Path, str]]:
    """Files that are not inspectors -> (path, what the error says)."""
    out = {}
    png = tmp_path / "a.fdseg"
    png.write_bytes(demo.supports[0][1].read_bytes())
    out["png"] = (png, "not an inspector file: it is a PNG image")
    empty = tmp_path / "empty.fdseg"
    empty.write_bytes(b"")
    out["empty"] = (empty, "not an inspector file: it is empty")
    bomb = tmp_path / "bomb.fdseg"                          # 64 MB of zeros, deflated to ~64 kB
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("data.bin", b"\0" * (64 << 20))
    out["zip"] = (bomb, "not an inspector file: it is a zip archive")
    ts = tmp_path / "torch.fdseg"
    torch.save({"x": torch.zeros(3)}, ts)
    out["torch.save"] = (ts, "not an inspector file: it is a zip archive")
    from safetensors.torch import save_file
    plain = tmp_path / "plain.fdseg"
    save_file({"w": torch.zeros(4)}, str(plain), metadata={"note": "not fdseg"})
    out["plain safetensors"] = (plain, "a safetensors file without fdseg's metadata")
    huge = tmp_path / "huge.fdseg"
    huge.write_bytes(struct.pack("<Q", 5 << 30) + b"{" + b" " * 100)
    out["gigabyte header"] = (huge, "over the 64 MiB limit")
    long = tmp_path / "long.fdseg"
    long.write_bytes(struct.pack("<Q", 1 << 20) + b"{" + b" " * 100)
    out["header beyond the file"] = (long, "truncated or not an inspector file")
    text = tmp_path / "text.fdseg"
    text.write_text("hello, this is not an inspector file at all\n")
    out["text"] = (text, "not an inspector file")
    return out


def test_files_that_are_not_inspectors(not_inspectors, tmp_path):
    for kind, (path, says) in not_inspectors.items():
        assert says in load_error(path), kind
    for kind in ("zip", "gigabyte header", "plain safetensors"):
        path, says = not_inspectors[kind]
        assert says in error_of(path), kind
    assert "does not exist" in load_error(tmp_path / "missing.fdseg")


def test_the_zip_bomb_is_not_opened(not_inspectors, monkeypatch):
    path, _ = not_inspectors["zip"]
    def refuse(*a, **k):
        raise AssertionError("the reader opened the zip archive")
    monkeypatch.setattr(zipfile.ZipFile, "__init__", refuse)
    load_error(path)


def _live_payload(marker: Path) -> bytes:
    """A serialised Python object that creates ``marker`` when deserialised."""
    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    return pickle.dumps(Boom())


def test_a_serialised_object_payload_is_never_run(fitted, demo, tmp_path, capsys):
    _, path = fitted
    proof = tmp_path / "proof"
    pickle.loads(_live_payload(proof)).close()        # the payload is live: deserialising runs it
    assert proof.exists()
    marker = tmp_path / "marker"
    payload = _live_payload(marker)
    header, data = parts(path)
    doc = json.loads(header["__metadata__"]["fdseg"])
    fg = header["method.fg"]
    # 1. the matcher's bank replaced by the payload, declared as a uint8 tensor, the hash made right
    a = fg["data_offsets"][0]
    new_data = data[:a] + payload + data[fg["data_offsets"][1]:]
    shift = len(payload) - (fg["data_offsets"][1] - a)
    for name, e in header.items():
        if name != "__metadata__" and e["data_offsets"][0] > a:
            e["data_offsets"] = [o + shift for o in e["data_offsets"]]
    header["method.fg"] = {"dtype": "U8", "shape": [len(payload)], "data_offsets": [a, a + len(payload)]}
    for name, e in header.items():
        if name != "__metadata__":
            doc["tensors"][name].update(st=e["dtype"], shape=e["shape"], offsets=e["data_offsets"])
    doc["tensors"]["method.fg"]["dtype"] = "uint8"
    header["__metadata__"]["fdseg"] = json.dumps(doc)
    bad = assemble(tmp_path / "payload_u8.fdseg", header, new_data)
    assert "fg must be a non-empty 2-D float tensor" in load_error(bad)
    assert main(["inspect", str(bad)]) == 0              # a valid container: inspect lists the bytes
    assert main(["segment", "--inspector", str(bad), "--query", str(demo.queries[0][0]),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fdseg: error: {bad}: ") and "2-D float" in err[0], err
    # 2. the same, declared with a dtype the reader does not know
    header["method.fg"]["dtype"] = "PICKLE"
    doc["tensors"]["method.fg"]["st"] = "PICKLE"
    header["__metadata__"]["fdseg"] = json.dumps(doc)
    bad2 = assemble(tmp_path / "payload_dtype.fdseg", header, new_data)
    assert "has dtype 'PICKLE', which this fdseg does not read" in load_error(bad2)
    assert "which this fdseg does not read" in error_of(bad2)
    # 3. the whole file a serialised object, and one after a valid-looking header length
    raw = tmp_path / "raw.fdseg"
    raw.write_bytes(payload)
    assert "serialised Python object" in load_error(raw)
    wrapped = tmp_path / "wrapped.fdseg"
    wrapped.write_bytes(struct.pack("<Q", len(payload)) + payload)
    load_error(wrapped)
    # 4. the same payload as the document's value of a setting: only JSON comes out
    header, data = parts(path)
    doc = json.loads(header["__metadata__"]["fdseg"])
    doc["settings"]["$dict"]["method_options"] = {"$object": payload.hex()}
    header["__metadata__"]["fdseg"] = json.dumps(doc)
    bad3 = assemble(tmp_path / "payload_doc.fdseg", header, data)
    assert "holds a value this fdseg does not read" in load_error(bad3)
    assert not marker.exists()


def test_hostile_documents_give_clean_errors(fitted, tmp_path):
    _, path = fitted
    header, data = parts(path)
    doc0 = json.loads(header["__metadata__"]["fdseg"])

    def with_doc(change, name):
        doc = json.loads(json.dumps(doc0))
        change(doc)
        h = json.loads(json.dumps(header))
        h["__metadata__"]["fdseg"] = json.dumps(doc).replace('"DEEP"', "[" * 5000 + "]" * 5000)
        return assemble(tmp_path / f"{name}.fdseg", h, data)

    cases = {
        "setting": (lambda d: d["settings"]["$dict"].update(evil=1), "setting(s) evil unknown"),
        "method attr": (lambda d: d["sections"]["method"]["attributes"].update(__class__=1), "no attribute"),
        "kind": (lambda d: d["sections"]["method"]["attributes"].update(head="x"), "expected a float"),
        "backbone kwargs": (lambda d: d["settings"]["$dict"]["backbone_options"]["$dict"].update(weights="x"),
                            "cannot rebuild its segmenter"),
        "preprocess": (lambda d: d["sections"]["plan"]["preprocess"].update(zoom=7), "cannot restore"),
        "post field": (lambda d: d["sections"]["post"]["fields"].update(shell="rm"), "unknown to this fdseg"),
        "deep": (lambda d: d["settings"]["$dict"].update(method_options="DEEP"), "the document is not JSON"),
    }
    for name, (change, says) in cases.items():
        assert says in load_error(with_doc(change, name.replace(" ", "_"))), name


# -- command line ---------------------------------------------------------------------------------------

def test_cli_fit_inspect_segment(demo, tmp_path, capsys):
    (img, mask), q = demo.supports[0], [str(p) for p, _ in demo.queries[:2]]
    out = tmp_path / "line3.fdseg"
    assert main(["fit", "--support", str(img), str(mask), "--preset", "fast", "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "plan (fast preset, 1 support):" in printed and "  matcher=fm because" in printed
    assert f"wrote {out} (" in printed and " MB" in printed
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    for what in ("format 1", "numeric path:", "backbone: efficientnet_lite0", "sha256", "settings: preset=fast",
                 "method.fg: torch float32", "support images: not included"):
        assert what in shown, what
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "fdseg-inspector"
    a, b = tmp_path / "fitted", tmp_path / "loaded"
    assert main(["segment", "--support", str(img), str(mask), "--preset", "fast", "--query", *q, "--out", str(a),
                 "--no-progress", "--threads", "1"]) == 0
    assert main(["segment", "--inspector", str(out), "--query", *q, "--out", str(b), "--no-progress",
                 "--threads", "1"]) == 0
    for p, _ in demo.queries[:2]:
        for sub in ("masks", "scores"):
            assert (a / sub / f"{p.stem}.png").read_bytes() == (b / sub / f"{p.stem}.png").read_bytes()
    rows = [json.loads((d / "summary.json").read_text()) for d in (a, b)]
    assert rows[0] == rows[1]
    capsys.readouterr()
    # --inspector and --support: one of them; no option the file fixes
    for argv, says in ((["--inspector", str(out), "--support", str(img), str(mask)], "not both"),
                       ([], "need --support IMAGE MASK"),
                       (["--inspector", str(out), "--preset", "paper", "--zoom", "2"], "drop --preset, --zoom"),
                       (["--inspector", str(out), "--normal", str(img)], "drop --normal")):
        assert main(["segment", *argv, "--query", *q, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err


def test_a_fresh_shell_without_the_supports_gives_the_masks_the_supports_gave(demo, tmp_path):
    """`fdseg fit --out F` in one process, the support files deleted, then `fdseg segment --inspector F` in a
    new process: the same mask and score files as `fdseg segment --support ...` wrote."""
    import shutil
    import subprocess
    import sys
    lab = tmp_path / "lab"
    lab.mkdir()
    (img, mask), q = demo.supports[0], [str(p) for p, _ in demo.queries[:3]]
    img, mask = Path(shutil.copy(img, lab)), Path(shutil.copy(mask, lab))
    run = lambda *argv: subprocess.run([sys.executable, "-m", "fdseg", *argv, "--threads", "1"], capture_output=True,
                                       text=True, timeout=600)
    r = run("segment", "--support", str(img), str(mask), "--query", *q, "--out", str(tmp_path / "a"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run("fit", "--support", str(img), str(mask), "--out", str(tmp_path / "line3.fdseg"))
    assert r.returncode == 0, r.stderr
    shutil.rmtree(lab)                                         # the line's PC has no support files
    r = run("segment", "--inspector", str(tmp_path / "line3.fdseg"), "--query", *q, "--out", str(tmp_path / "b"),
            "--no-progress")
    assert r.returncode == 0, r.stderr
    for p, _ in demo.queries[:3]:
        for sub in ("masks/{}.png", "scores/{}.png", "overlays/{}.jpg"):
            assert (tmp_path / "a" / sub.format(p.stem)).read_bytes() == \
                (tmp_path / "b" / sub.format(p.stem)).read_bytes(), (sub, p.name)


def test_cli_warns_about_another_numeric_path(fitted, demo, tmp_path, capsys):
    seg, path = fitted
    other = "fp32" if seg.settings["precision"] == "bf16" else "bf16"
    assert main(["segment", "--inspector", str(path), "--precision", other, "--query", str(demo.queries[0][0]),
                 "--out", str(tmp_path / "o"), "--no-progress", "--threads", "1"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(err) == 1 and "masks may differ slightly" in err[0]


# -- real data ------------------------------------------------------------------------------------------

def _uneven(defects_root):
    cls = defects_root / "magnetic_tile" / "uneven"
    images = sorted((cls / "images").iterdir())
    return images, [cls / "masks" / f"{p.stem}.png" for p in images]


@pytest.mark.data
@pytest.mark.parametrize("preset,shots", [("paper", 2), ("fast", 2), ("accurate", 1)])
def test_every_preset_predicts_the_same_bytes_after_loading(defects_root, tmp_path, preset, shots):
    images, masks = _uneven(defects_root)
    seg = fdseg.FewShotSegmenter(preset=preset).fit(images[:shots], masks[:shots])
    loaded = fdseg.load(seg.save(tmp_path / f"{preset}.fdseg"))
    assert str(loaded.plan) == str(seg.plan)
    queries = images[10:13] if preset != "accurate" else images[10:12]
    for a, b in zip(seg.predict(queries), loaded.predict(queries)):
        same_prediction(a, b)


@pytest.mark.data
def test_the_ok_gate_and_the_normals_come_back(defects_root, distill_root, tmp_path):
    from fdseg.normals import NormalPool, evenly
    images, masks = _uneven(defects_root)
    files = NormalPool.scan(distill_root).files("magnetic_tile", "uneven")
    oks = evenly(files, 3)
    normals = evenly([p for p in files if p not in set(oks)], 25)
    seg = fdseg.FewShotSegmenter(preset="fast", cache_size=64).fit(images[:1], masks[:1], normals=normals)
    assert isinstance(seg.plan["ok gate"], float) and seg.state.post.ok_level is not None
    path = seg.save(tmp_path / "gate.fdseg")
    loaded = fdseg.load(path)
    assert loaded.state.post.ok_level == seg.state.post.ok_level
    assert loaded.state.post.ok_components == seg.state.post.ok_components
    assert loaded.state.method.describe() == seg.state.method.describe()
    assert loaded.state.method.n_normals == 20
    queries = [oks[0], oks[1], images[12]]
    for a, b in zip(seg.predict(queries), loaded.predict(queries)):
        same_prediction(a, b)
    # the normals are reduced into fixed-size banks: the file does not grow with them
    plain = fdseg.FewShotSegmenter(preset="fast").fit(images[:1], masks[:1]).save(tmp_path / "plain.fdseg")
    assert abs(path.stat().st_size - plain.stat().st_size) < 4096
