"""Several defect types through the REST API of ``fdseg serve`` (field ``type``, one per support) on real
magnetic-tile blowholes and cracks: the label maps are the library's, the results ZIP and the inspector
file keep the types, bad type lists get a 400 naming 'type', untyped sessions are unchanged."""
from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
pytestmark = [pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"), pytest.mark.data]

import fdseg  # noqa: E402
from fdseg.multitype import MultiTypeSegmenter, legend  # noqa: E402
from fdseg.serve import ServeConfig, create_app  # noqa: E402
from fdseg.serve.uploads import rle_decode  # noqa: E402
from serve_util import error_of  # noqa: E402

torch.set_num_threads(1)

TYPES = ["blowhole", "crack"]


@pytest.fixture(scope="module")
def tile(defects_root):
    """Per type (blowhole, crack): its first image as the support, its second as the query: (image, mask)."""
    root = defects_root / "magnetic_tile"
    out = {}
    for t in TYPES:
        ims = sorted((root / t / "images").iterdir())[:2]
        out[t] = [(p, root / t / "masks" / f"{p.stem}.png") for p in ims]
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from starlette.testclient import TestClient
    with TestClient(create_app(ServeConfig(sessions_dir=tmp_path_factory.mktemp("sessions"))),
                    base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def library(tile):
    """The library's multi-type segmenter on the same supports (the server's default settings)."""
    return MultiTypeSegmenter().fit([tile[t][0][0] for t in TYPES], [tile[t][0][1] for t in TYPES], types=TYPES)


def _file(field, path, name=None):
    return (field, (name or Path(path).name, Path(path).read_bytes()))


def _supports(tile, types=TYPES):
    files = []
    for t in TYPES:
        files += [_file("support", tile[t][0][0]), _file("mask", tile[t][0][1])]
    return files, [("type", (None, t)) for t in types]


def _typed_session(client, tile, **settings) -> dict:
    files, types = _supports(tile)
    r = client.post("/v1/sessions", files=files + types, data=settings)
    assert r.status_code == 201, r.text
    return r.json()


def _png(data_b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(data_b64))))


def _queries(tile):
    return [_file("query", tile[t][1][0]) for t in TYPES]



def test_typed_session_labels_are_the_librarys(client, tile, library):
    info = _typed_session(client, tile)
    assert info["types"] == TYPES and info["legend"] == legend(TYPES)
    assert [s["type"] for s in info["supports"]] == TYPES
    assert client.get(f"/v1/sessions/{info['id']}").json()["types"] == TYPES
    r = client.post(f"/v1/sessions/{info['id']}/segment", files=_queries(tile), data={"overlay": "1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["types"] == TYPES and body["legend"] == legend(TYPES)
    for res, t in zip(body["results"], TYPES):
        q = tile[t][1][0]
        pred = library.predict(q)
        assert res["types"] == TYPES and res["type"] == pred.type
        assert res["labels"]["format"] == "png" and res["mask"]["format"] == "png"
        labels = _png(res["labels"]["data"])
        assert labels.shape == (res["height"], res["width"]) == Image.open(q).size[::-1]
        assert set(np.unique(labels)) <= {0, 1, 2}
        mask = _png(res["mask"]["data"]) > 0
        assert np.array_equal(labels > 0, mask)                  # a label only where the mask is set
        assert labels.tobytes() == pred.labels.tobytes()          # byte-equal to the library's label map
        assert np.array_equal(mask, pred.mask)
        assert res["defects"] == pred.defects and res["verdicts"] == pred.verdicts and res["areas"] == pred.areas
        assert set(res["fractions"]) == {k for k, a in pred.areas.items() if a}
        ov = Image.open(io.BytesIO(base64.b64decode(res["overlay_jpeg"])))
        assert ov.size == (res["width"], res["height"])
    # the blowhole query's strongest defect is a blowhole
    assert body["results"][0]["type"] == "blowhole" and body["results"][0]["verdicts"]["blowhole"] == "defective"

    z = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/sessions/{info['id']}/results.zip").content))
    names = set(z.namelist())
    for res in body["results"]:
        stem = Path(res["name"]).stem
        assert {f"labels/{stem}.png", f"masks/{stem}.png", f"overlays/{stem}.jpg"} <= names
        assert np.array_equal(np.array(Image.open(z.open(f"labels/{stem}.png"))), _png(res["labels"]["data"]))
    assert json.loads(z.read("labels/legend.json")) == {"good": 0, "types": legend(TYPES)}
    rows = json.loads(z.read("summary.json"))
    assert [r["type"] for r in rows] == [res["type"] or "" for res in body["results"]]
    report = z.read("report.html").decode()
    assert "Defect types" in report and all(e["colour"] in report for e in legend(TYPES))
    assert "type" in z.read("summary.csv").decode().splitlines()[0].split(",")


def test_one_call_segment_with_types_and_rle_labels(client, tile, library):
    files, types = _supports(tile)
    r = client.post("/v1/segment", files=files + types + _queries(tile)[1:], data={"mask_format": "rle"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["types"] == TYPES and body["legend"] == legend(TYPES)
    res = body["results"][0]
    pred = library.predict(tile["crack"][1][0])
    assert res["labels"]["format"] == "rle" and res["labels"]["size"] == [res["height"], res["width"]]
    for k, t in enumerate(TYPES, 1):
        assert np.array_equal(rle_decode(res["labels"]["by_type"][t]), pred.labels == k)
    assert "overlay_jpeg" not in res


def test_a_bad_type_list_gets_400_naming_type(client, tile):
    files, types = _supports(tile)
    for route, extra in (("/v1/sessions", []), ("/v1/segment", _queries(tile)[:1])):
        msg = error_of(client.post(route, files=files + types[:1] + extra), 400, "type", "1 types for 2 supports")
        assert msg.startswith("type:")
        error_of(client.post(route, files=files + types + [("type", (None, "fray"))] + extra), 400, "type")
        error_of(client.post(route, files=files + [("type", (None, "crack")), ("type", (None, "  "))] + extra), 400,
             "type", "support 2's type is empty")
        error_of(client.post(route, files=files + [("type", (None, "x" * 61)), ("type", (None, "crack"))] + extra), 400,
             "type", "at most 60")


def test_untyped_sessions_are_unchanged(client, tile):
    files, _ = _supports(tile)
    sup_imgs, sup_masks = [tile[t][0][0] for t in TYPES], [tile[t][0][1] for t in TYPES]
    seg = fdseg.FewShotSegmenter().fit(sup_imgs, sup_masks)
    one = [("type", (None, "defect")), ("type", (None, "defect"))]     # one type for all: today's segmenter
    for extra in ([], one):
        r = client.post("/v1/sessions", files=files + extra)
        assert r.status_code == 201, r.text
        info = r.json()
        assert "types" not in info and "legend" not in info
        assert [s.get("type") for s in info["supports"]] == ([None, None] if not extra else ["defect", "defect"])
        r = client.post(f"/v1/sessions/{info['id']}/segment", files=_queries(tile), data={"overlay": "1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"session", "results"}
        for res, t in zip(body["results"], TYPES):
            assert not {"labels", "types", "type", "defects", "verdicts", "legend"} & set(res)
            assert np.array_equal(_png(res["mask"]["data"]) > 0, seg.predict(tile[t][1][0]).mask)
        z = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/sessions/{info['id']}/results.zip").content))
        assert not any(n.startswith("labels/") for n in z.namelist())
        assert "Defect types" not in z.read("report.html").decode()


def test_typed_inspector_and_saved_session_keep_the_types(client, tile):
    # the fast preset: the accurate one's file (every cell of the other type's 8 support views in each type's
    # bank) is ~100 MB, over the server's default request limit (64 MB)
    info = _typed_session(client, tile, preset="fast")
    seg_q = lambda sid: client.post(f"/v1/sessions/{sid}/segment", files=_queries(tile),  # noqa: E731
                                    data={"overlay": "1"}).json()
    before = seg_q(info["id"])
    r = client.get(f"/v1/sessions/{info['id']}/inspector")
    assert r.status_code == 200, r.text
    r = client.post("/v1/inspectors", files=[("inspector", ("two types.fdseg", r.content))])
    assert r.status_code == 201, r.text
    opened = r.json()
    assert opened["source"] == "inspector" and opened["types"] == TYPES and opened["legend"] == legend(TYPES)
    assert [s["type"] for s in opened["supports"]] == TYPES and opened["inspector"]["supports"] == 2
    after = seg_q(opened["id"])
    assert after["types"] == TYPES and after["legend"] == before["legend"]
    assert after["results"] == before["results"]           # every key: labels, defects, overlay bytes too

    saved = client.post(f"/v1/sessions/{info['id']}/save").json()
    r = client.post(f"/v1/saved/{saved['id']}/open")
    assert r.status_code == 201, r.text
    reopened = r.json()
    assert reopened["types"] == TYPES and [s["type"] for s in reopened["supports"]] == TYPES
    again = seg_q(reopened["id"])
    assert [x["labels"] for x in again["results"]] == [x["labels"] for x in before["results"]]


@pytest.mark.browser
def test_the_page_sends_types_and_shows_the_legend(tile):
    """Two supports whose mask files are uploaded and whose types are typed in: one type missing is refused on
    the page; named, the result card shows the overlay, the query's type and the legend in the server's colours."""
    from test_serve_browser import CHROMIUM, FLAGS, _need_browser
    _need_browser()
    from playwright.sync_api import sync_playwright

    from serve_util import running_server
    app = create_app(ServeConfig(sessions_dir=None))
    errors: list[str] = []
    with running_server(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, bypass_csp=True)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('method').options.length > 0")
            for k, t in enumerate(TYPES):
                page.set_input_files("#support-input", str(tile[t][0][0]))
                card = page.locator("#support-list .card").nth(k)
                card.wait_for()
                card.locator("input.mask-input").set_input_files(str(tile[t][0][1]))
                page.wait_for_function(f"document.querySelectorAll('#support-list .card .meta span')[{k}]"
                                       ".textContent !== '0.00%'")
            page.locator("#support-list .card input.type-input").nth(0).fill(TYPES[0])
            page.set_input_files("#query-input", str(tile["crack"][1][0]))
            page.click("#run-btn")
            page.wait_for_function("document.getElementById('status').classList.contains('error')")
            assert "support 2" in page.locator("#status").inner_text() and \
                "name its defect type too" in page.locator("#status").inner_text()
            page.locator("#support-list .card input.type-input").nth(1).fill(TYPES[1])
            page.click("#run-btn")
            try:
                page.wait_for_function("document.querySelectorAll('#results .result.done').length === 1",
                                       timeout=60_000)
            except Exception:
                pytest.fail("no result; page status: " + page.locator("#status").inner_text())
            assert page.evaluate("state.info.types") == TYPES
            card = page.locator("#results .result.done").first
            assert card.locator("img.overlay").count() == 1
            items = card.locator(".types .legend li")
            assert items.count() == 2 and [items.nth(i).get_attribute("data-type") for i in range(2)] == TYPES
            colours = [items.nth(i).locator(".swatch").evaluate("e => getComputedStyle(e).backgroundColor")
                       for i in range(2)]
            want = ["rgb(%d, %d, %d)" % tuple(int(e["colour"][j:j + 2], 16) for j in (1, 3, 5)) for e in legend(TYPES)]
            assert colours == want
            qtype = card.locator(".query-type").inner_text()
            assert qtype in TYPES + ["none"]
            legend_bar = page.locator("#type-legend")
            assert legend_bar.is_visible() and legend_bar.locator("li").count() == 2
        finally:
            browser.close()
    assert not errors, errors
