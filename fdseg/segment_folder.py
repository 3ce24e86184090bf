"""Segment many query images against fitted supports and write what people look at.

For each query ``STEM``: ``masks/STEM.png`` (0/255, the query's own size),
``scores/STEM.png`` (the soft score map, 0..255, 128 = decision boundary),
``overlays/STEM.jpg``; one row in ``summary.csv`` / ``summary.json``; and
``report.html``, a gallery sorted so that defective images come first.

A bad query is skipped and reported as an error row; every finished query is in
``summary.jsonl`` at once, so a killed run loses nothing and ``resume=True``
picks up where it stopped. All files are written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .atomic import write_jpeg, write_png, write_text
from .data.images import is_image_file
from .errors import FdsegError, InputError
from .report.html import card, esc, table, write_page
from .report.overlay import GREEN, overlay
from .segmenter import FewShotSegmenter, Prediction

FIELDS = ["query", "file", "width", "height", "defect_fraction", "components", "boxes", "max_score", "status", "error"]


def collect_queries(items: Iterable[str | Path]) -> list[Path]:
    """Files and folders (their image files, sorted) -> list of query paths."""
    out: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            out.extend(sorted((q for q in p.iterdir() if is_image_file(q)), key=lambda q: q.name))
        elif p.exists():
            out.append(p)
        else:
            matches = sorted(Path().glob(str(it))) if any(c in str(it) for c in "*?[") else []
            if not matches:
                raise InputError(p, "query file or folder does not exist")
            out.extend(m for m in matches if m.is_file())
    if not out:
        raise InputError(", ".join(map(str, items)), "no query images found")
    return out


def _unique_names(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        base = p.stem
        n = seen.get(base, 0)
        seen[base] = n + 1
        names.append(base if n == 0 else f"{base}_{n}")
    return names


@dataclass
class FolderResult:
    rows: list[dict]
    out: Path

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]


def write_outputs(out: Path, name: str, pred: Prediction, rgb: np.ndarray) -> None:
    """The three images of one query, each written atomically."""
    write_png(out / "masks" / f"{name}.png", pred.mask)
    write_png(out / "scores" / f"{name}.png", np.round(pred.score * 255).astype(np.uint8))
    write_jpeg(out / "overlays" / f"{name}.jpg", overlay(rgb, pred.mask))


def _row(name: str, path: Path, pred: Prediction | None, error: str | None = None) -> dict:
    if pred is None:
        return {"query": name, "file": str(path), "width": None, "height": None, "defect_fraction": None,
                "components": None, "boxes": [], "max_score": None, "status": "error", "error": error}
    h, w = pred.mask.shape
    return {"query": name, "file": str(path), "width": w, "height": h,
            "defect_fraction": round(pred.defect_fraction, 6), "components": len(pred.boxes),
            "boxes": [list(b) for b in pred.boxes], "max_score": round(pred.max_score, 4),
            "status": "ok", "error": ""}


def segment_folder(seg: FewShotSegmenter, queries: list[Path], out: str | Path, *, progress: bool = True,
                   resume: bool = False, supports: list[tuple[Path, Path]] | None = None) -> FolderResult:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names(queries)
    log_path = out / "summary.jsonl"
    done: dict[str, dict] = {}
    if resume and log_path.exists():
        for ln in log_path.read_text().splitlines():
            try:
                r = json.loads(ln)
                done[r["query"]] = r
            except (json.JSONDecodeError, KeyError):
                continue
    write_text(log_path, "".join(json.dumps(r) + "\n" for r in done.values()))
    todo = [(n, q) for n, q in zip(names, queries) if n not in done or done[n]["status"] != "ok"]
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(queries), initial=len(queries) - len(todo), desc="segment", unit="img", dynamic_ncols=True)
    with open(log_path, "a", encoding="utf-8") as log:
        # predict_stream yields in input order, one result per query
        for (name, q), (_, res) in zip(todo, seg.predict_stream([q for _, q in todo])):
            try:
                if isinstance(res, BaseException):
                    raise res
                write_outputs(out, name, res, res.image if res.image is not None else seg.load(q))
                row = _row(name, q, res)
            except FdsegError as e:
                row = _row(name, q, None, str(e))
            log.write(json.dumps(row) + "\n")
            log.flush()
            os.fsync(log.fileno())
            done[name] = row
            if bar:
                bar.update(1)
                if row["status"] != "ok":
                    bar.write(f"skipped {q}: {row['error']}")
    if bar:
        bar.close()
    rows = [done[n] for n in names if n in done]
    _write_summary(out, rows)
    _write_report(out, rows, seg, supports or [])
    return FolderResult(rows, out)


def _write_summary(out: Path, rows: list[dict]) -> None:
    write_text(out / "summary.json", json.dumps(rows, indent=1))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({**r, "boxes": json.dumps(r["boxes"])})
    write_text(out / "summary.csv", buf.getvalue())


def _write_report(out: Path, rows: list[dict], seg: FewShotSegmenter, supports: list[tuple[Path, Path]]) -> Path:
    from .data.images import load_image, load_mask
    secs = [f"<p class='muted'>settings: {esc(json.dumps(seg.describe()))}</p>"]
    if supports:
        cards = []
        for i, (im, m) in enumerate(supports):
            rgb = load_image(im)
            rel = f"supports/support_{i + 1}.jpg"
            write_jpeg(out / rel, overlay(rgb, load_mask(m, size=rgb.shape[:2]), GREEN))
            cards.append(card(rel, f"support {i + 1}: {Path(im).name}"))
        secs.append("<h2>Supports</h2><div class='grid'>" + "".join(cards) + "</div>")
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (-r["defect_fraction"], r["query"]))
    bad = [r for r in rows if r["status"] != "ok"]
    secs.append("<h2>Queries</h2>" + table(
        ["query", "defect area", "components", "max score", "status"],
        [[r["query"], f"{100 * r['defect_fraction']:.3f}%", r["components"], r["max_score"], "ok"] for r in ok] +
        [[r["query"], "-", "-", "-", r["error"]] for r in bad]))
    secs.append("<h2>Overlays (most defective first)</h2><div class='grid'>" + "".join(
        card(f"overlays/{r['query']}.jpg", f"{r['query']}: {100 * r['defect_fraction']:.3f}% defect, "
                                            f"max score {r['max_score']}") for r in ok) + "</div>")
    return write_page(out / "report.html", "fdseg segmentation", secs)
