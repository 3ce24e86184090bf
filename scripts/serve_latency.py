"""Latency of `fdseg serve` against the library it wraps, on real images.

    .venv/bin/python scripts/serve_latency.py [--data ../shared/data/defects] [--n 10]

For each image set: the library's own fit + predict (in this process, warm), then the same
through a real `fdseg serve` process over HTTP: POST /v1/sessions (fit), sequential
POST /v1/sessions/ID/segment (one query per request; mask as PNG, with and without the
overlay JPEG), alternating with the library query by query so both see the same load, and
N concurrent requests (throughput with the bounded pool). Prints a Markdown table of medians;
on a shared machine compare the ratios, not the milliseconds.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import fdseg

SETS = [("sd_saliency_900/scratches", "200 x 200 grey"), ("visa/capsules", "1500 x 1000 RGB")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def med(xs):
    return statistics.median(xs) * 1000


def server_costs(d: Path, n: int) -> dict[str, float]:
    """Median ms of each step the server adds around predict, in this process."""
    import tempfile

    import numpy as np

    from fdseg.report.overlay import overlay
    from fdseg.serve.uploads import Upload, b64, decode_image, jpeg_bytes, png_bytes, rle_encode
    imgs = sorted((d / "images").iterdir())[: n + 1]
    seg = fdseg.FewShotSegmenter().fit([imgs[0]], [d / "masks" / f"{imgs[0].stem}.png"])
    steps = {k: [] for k in ("decode upload", "predict", "mask PNG+base64", "mask RLE", "overlay JPEG",
                             "score PNG (kept for ZIP)")}
    for q in imgs[1:]:
        def timed(key, fn):
            t = time.perf_counter()
            out = fn()
            steps[key].append(time.perf_counter() - t)
            return out
        with tempfile.TemporaryDirectory() as tmp:
            rgb = timed("decode upload", lambda: decode_image(Upload(q.read_bytes(), q.name, "query 1"), Path(tmp), 0,
                                                              max_pixels=40_000_000, min_size=16))
        p = timed("predict", lambda: seg.predict(rgb))
        timed("mask PNG+base64", lambda: b64(png_bytes(p.mask)))
        timed("mask RLE", lambda: rle_encode(p.mask))
        timed("overlay JPEG", lambda: jpeg_bytes(overlay(rgb, p.mask)))
        timed("score PNG (kept for ZIP)", lambda: png_bytes(np.round(p.score * 255).astype(np.uint8), level=1))
    return {k: med(v) for k, v in steps.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "defects"))
    ap.add_argument("--n", type=int, default=10, help="queries per set")
    a = ap.parse_args()
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "fdseg", "serve", "--port", str(port), "--sessions-dir", "",
                               "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        c = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64))
        for _ in range(300):
            try:
                if c.get("/v1/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        for rel, desc in SETS:
            d = Path(a.data) / rel
            imgs = sorted((d / "images").iterdir())[: a.n + 1]
            sup, sup_mask, qs = imgs[0], d / "masks" / f"{imgs[0].stem}.png", imgs[1:]
            # library (this process) and API (the server process), warm; then each query through both,
            # alternating, so both see the same machine load
            seg = fdseg.FewShotSegmenter()
            files = [("support", (sup.name, sup.read_bytes())), ("mask", (sup_mask.name, sup_mask.read_bytes()))]
            seg.fit([sup], [sup_mask])
            seg.predict(qs[0])
            sid = c.post("/v1/sessions", files=files).json()["id"]
            c.post(f"/v1/sessions/{sid}/segment", files=[("query", (qs[0].name, qs[0].read_bytes()))])
            lib_fit, api_fit = [], []
            for _ in range(3):
                t = time.perf_counter()
                seg.fit([sup], [sup_mask])
                lib_fit.append(time.perf_counter() - t)
                t = time.perf_counter()
                sid = c.post("/v1/sessions", files=files).json()["id"]
                api_fit.append(time.perf_counter() - t)
            lib, api, api_ov = [], [], []
            for q in qs:
                t = time.perf_counter()
                seg.predict(q)
                lib.append(time.perf_counter() - t)
                for out, data in ((api, {}), (api_ov, {"overlay": "1"})):
                    t = time.perf_counter()
                    r = c.post(f"/v1/sessions/{sid}/segment", files=[("query", (q.name, q.read_bytes()))], data=data)
                    out.append(time.perf_counter() - t)
                    assert r.status_code == 200, r.text
            t = time.perf_counter()
            with ThreadPoolExecutor(len(qs)) as ex:
                rs = list(ex.map(lambda q: c.post(f"/v1/sessions/{sid}/segment",
                                                  files=[("query", (q.name, q.read_bytes()))]), qs))
            conc = time.perf_counter() - t
            assert all(r.status_code == 200 for r in rs)
            ratio = statistics.median(x / y for x, y in zip(api, lib))
            rows.append((desc, med(lib_fit), med(lib), med(api_fit), med(api), med(api_ov), ratio,
                         len(qs) / conc, len(qs) / sum(lib)))
    finally:
        server.terminate()
        server.wait(10)
    costs = [(desc, server_costs(Path(a.data) / rel, a.n)) for rel, desc in SETS]
    print(f"\n{platform.processor() or platform.machine()}, torch threads {__import__('torch').get_num_threads()}, "
          f"{a.n} queries per set\n")
    print("| images | library fit ms | library predict ms | API fit ms | API segment ms (PNG mask) | "
          "API segment ms (+ overlay) | API / library (paired median) | API img/s, concurrent | library img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.2f} | "
              f"{r[7]:.2f} | {r[8]:.2f} |")
    keys = list(costs[0][1])
    print("\nserver-side steps per query, in-process, median ms\n")
    print("| images | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for desc, c in costs:
        print(f"| {desc} | " + " | ".join(f"{c[k]:.0f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
