"""The web app end to end in a real headless browser (Debian chromium driven by Playwright).

The server is token-protected (as on a network address) and the page is opened with ``#token=...``
as ``fdseg serve`` prints it. A support image is uploaded, its defect painted with the mouse along the real crack (and a
slip of the brush erased); a second support gets its mask file uploaded; two queries are
uploaded and segmented; the overlays must appear with a non-zero
defect area, the painted mask the server received must lie on the real crack, and the
page must not have asked for anything outside the server. A second, quicker test opens the page
without the token: it must ask for it, refuse a wrong one, then work; its result cards must say what
their verdict is (a speck below one grid cell is named, not counted as a defect region). The screenshot goes to the
test's tmp folder, and to docs/serve-app.png (the README's) when FDSEG_UPDATE_DOCS=1.

Skips when chromium or Playwright is missing, unless FDSEG_REQUIRE_BROWSER=1 (CI).
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from serve_util import running_server

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve-app.png"
TOKEN = "browser-test-token-" + "k" * 24


def _check_page_basics(page):
    """Only runnable choices are offered; what the others need is one collapsed line, not a list."""
    page.wait_for_function("document.getElementById('backbone').options.length > 0")
    backbones = page.locator("#backbone option").all_inner_texts()
    assert "efficientnet_lite0" in backbones and "pdn_small" not in backbones and "onnx" not in backbones
    note = page.locator("#option-note")
    assert note.locator("details").count() <= 1 and not note.locator("details[open]").count()
    shown = note.inner_text()
    assert "needs weights" not in shown and shown.count("\n") <= 1, shown
    if note.locator("summary").count():
        note.locator("summary").click()             # opened: one line per kind of need, not per entry
        lines = note.locator("li").all_inner_texts()
        assert sum("--weights" in ln for ln in lines) == 1, lines
        note.locator("summary").click()


def _check_cards_agree(page) -> list[dict]:
    """Each result card's words agree with its verdict: defective <-> at least one defect region."""
    cards = page.locator("#results .result.done")
    out = []
    for i in range(cards.count()):
        c = cards.nth(i)
        verdict, regions = c.get_attribute("data-verdict"), int(c.locator(".components").inner_text())
        text = c.locator(".meta").nth(1).inner_text()
        if verdict == "defective":
            assert c.locator(".verdict").inner_text() == "defective" and regions >= 1, text
        else:
            assert c.locator(".verdict").inner_text() == "OK" and regions == 0, text
            assert c.locator(".specks").count() == 0 or "not a defect" in text, text
        out.append({"verdict": verdict, "regions": regions, "text": text})
    return out


def _need_browser():
    why = None
    if not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} not found (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            why = "playwright is not installed (pip install playwright; never `playwright install`)"
    if why:
        if os.environ.get("FDSEG_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required (FDSEG_REQUIRE_BROWSER=1) but {why}")
        pytest.skip(why)


def _stroke_points(mask: np.ndarray, n: int = 30) -> list[tuple[float, float]]:
    """Points along a thin defect: n steps over its longer extent, the middle defect pixel at each."""
    along_x = np.ptp(np.nonzero(mask)[1]) > np.ptp(np.nonzero(mask)[0])
    m = mask.T if along_x else mask
    rows = np.flatnonzero(m.any(axis=1))
    pts = []
    for r in np.linspace(rows[0], rows[-1], n).round().astype(int):
        cs = np.flatnonzero(m[r])
        if len(cs):
            c = float(cs[len(cs) // 2]) + 0.5
            pts.append((float(r) + 0.5, c) if along_x else (c, float(r) + 0.5))
    return pts


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.browser
def test_paint_support_segment_queries_in_browser(defects_root, tmp_path):
    _need_browser()
    from playwright.sync_api import sync_playwright

    from fdseg.serve import ServeConfig, create_app

    cls = defects_root / "crackforest" / "crack"
    imgs = sorted((cls / "images").iterdir())
    support, queries = imgs[0], imgs[1:3]
    gt = np.array(Image.open(cls / "masks" / f"{support.stem}.png")) > 0
    # the browser gets copies with plain names (what a user's files look like)
    sup_file = tmp_path / f"support{support.suffix}"
    shutil.copy(support, sup_file)
    q_files = []
    for i, q in enumerate(queries):
        q_files.append(tmp_path / f"query_{i + 1}{q.suffix}")
        shutil.copy(q, q_files[-1])

    app = create_app(ServeConfig(sessions_dir=tmp_path / "sessions", token=TOKEN))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    outside: list[str] = []
    console_errors: list[str] = []
    with running_server(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            # bypass_csp only lets Playwright's own evaluate() run; requests are still checked below
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, bypass_csp=True)
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith((url, "data:", "blob:")) else None)
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/#token=" + TOKEN)           # as fdseg serve prints it on a network address
            page.wait_for_function("document.getElementById('method').options.length > 0")
            assert "fm" in page.locator("#method option").all_inner_texts()
            assert TOKEN not in page.evaluate("location.href")          # taken off the address bar
            assert page.locator("#token-section").is_hidden()
            _check_page_basics(page)

            page.set_input_files("#support-input", str(sup_file))
            canvas = page.locator("#support-list canvas.mask").first
            canvas.wait_for()
            box = canvas.bounding_box()
            h, w = gt.shape
            page.evaluate("() => { const b = document.getElementById('brush-size'); b.value = 6; "
                          "b.dispatchEvent(new Event('input')); }")
            pts = [(box["x"] + x * box["width"] / w, box["y"] + y * box["height"] / h) for x, y in _stroke_points(gt)]
            page.mouse.move(*pts[0])
            page.mouse.down()
            for pt in pts[1:]:
                page.mouse.move(*pt, steps=4)
            page.mouse.up()
            pct = lambda i: float(page.locator("#support-list .card .meta span").nth(i).inner_text().rstrip("%"))  # noqa: E731
            painted = pct(0)
            assert painted > 0
            # a slip of the brush off the crack, then the eraser takes it back
            free = np.argwhere(~ndimage.binary_dilation(gt, iterations=40))
            far = free[np.argmin(np.abs(free - np.array(gt.shape) / 2).sum(axis=1))]   # nearest the centre
            spot = (box["x"] + (far[1] + 0.5) * box["width"] / w, box["y"] + (far[0] + 0.5) * box["height"] / h)
            page.mouse.move(*spot)
            page.mouse.down()
            page.mouse.move(spot[0] + 10, spot[1], steps=3)
            page.mouse.up()
            assert pct(0) > painted
            page.check("#tool-eraser")
            page.evaluate("() => { const b = document.getElementById('brush-size'); b.value = 40; "
                          "b.dispatchEvent(new Event('input')); }")
            page.mouse.move(spot[0] - 5, spot[1])
            page.mouse.down()
            page.mouse.move(spot[0] + 15, spot[1], steps=4)
            page.mouse.up()
            assert pct(0) == pytest.approx(painted, abs=0.02)
            page.check("#tool-brush")
            # a second support whose mask is uploaded as a file instead of painted
            sup2 = tmp_path / f"support2{imgs[3].suffix}"
            shutil.copy(imgs[3], sup2)
            page.set_input_files("#support-input", str(sup2))
            page.locator("#support-list .card").nth(1).wait_for()
            page.locator("#support-list .card").nth(1).locator("input.mask-input").set_input_files(
                str(cls / "masks" / f"{imgs[3].stem}.png"))
            gt2 = np.array(Image.open(cls / "masks" / f"{imgs[3].stem}.png")) > 0
            page.wait_for_function("document.querySelectorAll('#support-list .card .meta span')[1].textContent "
                                   "!== '0.00%'")
            assert pct(1) == pytest.approx(100 * gt2.mean(), abs=0.01)

            page.set_input_files("#query-input", [str(f) for f in q_files])
            page.click("#run-btn")
            try:
                page.wait_for_function("document.querySelectorAll('#results .result.done img.overlay').length === 2",
                                       timeout=120_000)
            except Exception:
                pytest.fail("no overlays; page status: " + page.locator("#status").inner_text() + " | " +
                            page.locator("#results").inner_text())
            cards = page.locator("#results .result.done")
            areas = [float(cards.nth(i).locator(".area").inner_text().rstrip("%")) for i in range(2)]
            assert all(a > 0 for a in areas), areas
            assert areas == sorted(areas, reverse=True)          # most defective first
            for i in range(2):                                   # the overlay image really decoded
                assert page.evaluate("(el) => el.naturalWidth", cards.nth(i).locator("img.overlay").element_handle()) \
                    == Image.open(queries[0]).size[0]
            assert not page.locator("#zip-link.disabled").count()
            _check_cards_agree(page)
            page.screenshot(path=str(tmp_path / "shot.png"), full_page=True)

            # the mask the server fitted on lies on the real crack
            sid = page.evaluate("state.session")
            import httpx
            assert httpx.get(f"{url}/v1/sessions/{sid}/supports/1/mask").status_code == 401
            got = np.array(Image.open(io.BytesIO(httpx.get(f"{url}/v1/sessions/{sid}/supports/1/mask",
                                                           headers=auth).content))) > 0
            assert got.shape == gt.shape
            near = ndimage.binary_dilation(gt, iterations=8)
            assert got.sum() > 50 and (got & near).sum() / got.sum() > 0.7
            got2 = np.array(Image.open(io.BytesIO(httpx.get(f"{url}/v1/sessions/{sid}/supports/2/mask",
                                                            headers=auth).content))) > 0
            assert (got2 == gt2).all()                            # an uploaded mask arrives unchanged
            # the download link fetches the results ZIP with the token; it has both masks
            with page.expect_download() as dl:
                page.click("#zip-link")
            import zipfile
            names = zipfile.ZipFile(dl.value.path()).namelist()
            assert {"masks/query_1.png", "masks/query_2.png", "summary.csv", "report.html"} <= set(names)
        finally:
            browser.close()
    assert not outside, f"the page requested outside resources: {outside}"
    assert not console_errors, console_errors
    if os.environ.get("FDSEG_UPDATE_DOCS") == "1":       # refresh the README's screenshot, kept small
        shot = Image.open(tmp_path / "shot.png").convert("RGB")
        shot.thumbnail((1100, 1100))
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shot.quantize(colors=128).save(SCREENSHOT, optimize=True)


@pytest.mark.browser
def test_page_asks_for_the_token_and_cards_say_their_verdict(demo, tmp_path, monkeypatch):
    """No #token in the address: the page asks once a call is refused, refuses a wrong token, then works
    (and keeps the token for the tab). The demo's support + mask, a blowhole query and a defect-free one
    are segmented; on the defect-free one a speck below one grid cell is added to the real prediction:
    its card must say OK and name the speck, not count it as a defect region."""
    _need_browser()
    from playwright.sync_api import sync_playwright

    import fdseg
    from fdseg.pipeline.finish import components
    from fdseg.serve import ServeConfig, create_app

    real_predict = fdseg.FewShotSegmenter.predict

    def predict_with_speck(self, image, *a, **k):
        pred = real_predict(self, image, *a, **k)
        if not pred.is_defective:                  # a 2 x 2 px speck at the centre: far below one cell
            h, w = pred.mask.shape
            assert 4 * pred.margin_grid.size < h * w
            pred.mask = pred.mask.copy()
            pred.mask[h // 2:h // 2 + 2, w // 2:w // 2 + 2] = True
            pred.boxes = components(pred.mask)[1]
        return pred
    monkeypatch.setattr(fdseg.FewShotSegmenter, "predict", predict_with_speck)

    (s_img, s_mask), (q_bad, _), q_ok = demo.supports[1], demo.queries[1], demo.free[1]
    app = create_app(ServeConfig(sessions_dir=None, token=TOKEN))
    outside: list[str] = []
    with running_server(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, bypass_csp=True)
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith((url, "data:", "blob:")) else None)
            page.goto(url + "/")
            page.locator("#token-section").wait_for(state="visible")
            assert page.locator("#method option").count() == 0          # nothing loaded without it
            assert "access token" in page.locator("#status").inner_text()
            page.fill("#token-input", "not-the-token")
            page.click("#token-form button[type=submit]")
            page.wait_for_function("document.getElementById('token-msg').textContent.includes('not accepted')")
            assert page.locator("#token-section").is_visible()
            page.fill("#token-input", TOKEN)
            page.click("#token-form button[type=submit]")
            page.wait_for_function("document.getElementById('method').options.length > 0")
            assert page.locator("#token-section").is_hidden()
            assert page.evaluate("sessionStorage.getItem('fdseg-token')") == TOKEN
            assert TOKEN not in page.evaluate("location.href")
            _check_page_basics(page)
            page.reload()                                               # the tab keeps it: not asked again
            page.wait_for_function("document.getElementById('method').options.length > 0")
            assert page.locator("#token-section").is_hidden()

            page.set_input_files("#support-input", str(s_img))
            page.locator("#support-list .card").first.wait_for()
            page.locator("#support-list .card input.mask-input").set_input_files(str(s_mask))
            page.wait_for_function("document.querySelector('#support-list .card .meta span').textContent !== '0.00%'")
            page.set_input_files("#query-input", [str(q_bad), str(q_ok)])
            page.click("#run-btn")
            try:
                page.wait_for_function("document.querySelectorAll('#results .result.done').length === 2",
                                       timeout=120_000)
            except Exception:
                pytest.fail("no results; page status: " + page.locator("#status").inner_text() + " | " +
                            page.locator("#results").inner_text())
            cards = {c["verdict"]: c for c in _check_cards_agree(page)}
            assert set(cards) == {"defective", "ok"}, cards
            ok = cards["ok"]["text"]
            assert ok.startswith("OK") and "0 defect regions" in ok and "1 speck below the smallest defect size" \
                in ok and "not a defect" in ok, ok
            page.screenshot(path=str(tmp_path / "token-shot.png"), full_page=True)
        finally:
            browser.close()
    assert not outside, f"the page requested outside resources: {outside}"


@pytest.mark.browser
def test_page_with_an_inspector_segments_at_once_and_saves_it(demo, tmp_path, monkeypatch):
    """A server started with an inspector file (as ``fdseg serve --inspector line3.fdseg``), token-protected:
    the page names the inspector instead of asking for supports, segments a dropped query at once, and
    "save inspector" downloads the fit (fetched with the token) as a file fdseg reads; "open inspector"
    uploads it back (here on the other numeric path: the page says so once) and switches to the new session."""
    _need_browser()
    from playwright.sync_api import sync_playwright

    import fdseg
    from fdseg.serve import ServeConfig, create_app

    line3 = tmp_path / "line3.fdseg"
    seg = fdseg.FewShotSegmenter(preset="fast", input_size=96).fit([demo.supports[0][0]], [demo.supports[0][1]])
    seg.save(line3)
    precision = seg.settings["precision"]
    q = demo.queries[0][0]
    expected = seg.predict(q)
    app = create_app(ServeConfig(sessions_dir=None, token=TOKEN, inspectors=[line3]))
    outside: list[str] = []
    console_errors: list[str] = []
    with running_server(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, bypass_csp=True, accept_downloads=True)
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith((url, "data:", "blob:")) else None)
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/#token=" + TOKEN)
            info = page.locator("#inspector-info")
            info.wait_for(state="visible")
            assert info.inner_text() == f"inspector line3.fdseg (fast preset, 1 support, fitted on {precision})"
            assert page.locator("#support-tools").is_hidden() and page.locator("#normal-section").is_hidden()
            assert page.locator("#precision-note").is_hidden()           # same numeric path: no note
            assert page.locator("#preset").is_disabled() and page.locator("#preset").input_value() == "fast"
            page.set_input_files("#query-input", str(q))                 # segmented at once: no supports, no fit
            try:
                page.wait_for_function("document.querySelectorAll('#results .result.done').length === 1",
                                       timeout=60_000)
            except Exception:
                pytest.fail("no result; page status: " + page.locator("#status").inner_text())
            card = page.locator("#results .result.done").first
            assert card.get_attribute("data-verdict") == ("defective" if expected.is_defective else "ok")
            assert float(card.get_attribute("data-defect-fraction")) == pytest.approx(expected.defect_fraction,
                                                                                      abs=1e-6)
            with page.expect_download() as dl:
                page.click("#inspector-save-btn")
            assert dl.value.suggested_filename == "line3.fdseg"
            got = tmp_path / "downloaded.fdseg"
            dl.value.save_as(got)
            assert (fdseg.load(got).predict(q).mask == expected.mask).all()
            first = page.evaluate("state.session")
            other = "fp32" if precision == "bf16" else "bf16"
            monkeypatch.setenv("FDSEG_PRECISION", other)                 # this server's path is the other one now
            page.set_input_files("#inspector-input", str(got))           # open it: a new session
            page.wait_for_function(f"state.session && state.session !== '{first}'")
            assert info.inner_text() == f"inspector downloaded.fdseg (fast preset, 1 support, fitted on {precision})"
            note = page.locator("#precision-note")
            assert note.is_visible() and f"fitted on the {precision} numeric path, loaded on {other}" in \
                note.inner_text()
            assert page.locator("text=numeric path:").count() == 1       # said once on the page
            assert page.locator("#inspector-pick").is_visible()          # two inspectors to choose from
            page.click("#inspector-close")                               # back to supports
            assert page.locator("#support-tools").is_visible() and not page.locator("#preset").is_disabled()
        finally:
            browser.close()
    assert not outside, f"the page requested outside resources: {outside}"
    assert not console_errors, console_errors
