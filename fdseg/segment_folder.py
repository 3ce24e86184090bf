"""Segment many query images against fitted supports and write what people look at.

For each query ``STEM``: ``masks/STEM.png`` (0/255, the query's own size),
``scores/STEM.png`` (the soft score map, 0..255, 128 = decision boundary),
``overlays/STEM.jpg``; one row in ``summary.csv`` / ``summary.json`` (with the image-level
``verdict``, defective or ok, and its ``defect_score``: :mod:`fdseg.pipeline.finish`); and
``report.html``, a gallery sorted so that defective images come first.

A multi-type segmenter (:mod:`fdseg.multitype`) also writes ``labels/STEM.png`` (a palette PNG: value k =
type k, 0 = good; the legend in its ``fdseg-legend`` text chunk) and ``labels/legend.json``, colours its
overlays by type, and adds the columns ``type`` (the type with the largest area) and ``types`` (type ->
defect fraction, JSON) to the summary.

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

from .atomic import encode_jpeg, encode_png, write_bytes, write_jpeg, write_text
from .data.images import ImageLike, is_image_file
from .errors import FdsegError, InputError
from .report.html import card, esc, table, write_page
from .report.overlay import GREEN, overlay
from .segmenter import FewShotSegmenter, Prediction

FIELDS = ["query", "file", "width", "height", "defect_fraction", "components", "boxes", "max_score", "verdict",
          "defect_score", "status", "error"]
TYPE_FIELDS = ["type", "types"]       # rows of a multi-type segmenter's predictions (after FIELDS)


def _typed(pred) -> bool:
    return getattr(pred, "labels", None) is not None and bool(getattr(pred, "types", ()))


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
            base = Path(p.anchor) if p.is_absolute() else Path()    # pathlib globs only relative patterns
            matches = sorted(base.glob(str(p.relative_to(base) if p.is_absolute() else it))) \
                if any(c in str(it) for c in "*?[") else []
            if not matches:
                raise InputError(p, "query file or folder does not exist")
            out.extend(m for m in matches if m.is_file())
    if not out:
        raise InputError(", ".join(map(str, items)), "no query images found")
    return out


def _unique_names(paths: list) -> list[str]:
    """Output name of each query: its file stem, ``STEM_1``, ``STEM_2`` ... for repeated stems."""
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


def _row(name: str, path: Path, pred: Prediction | None, error: str | None = None) -> dict:
    if pred is None:
        return {"query": name, "file": str(path), "width": None, "height": None, "defect_fraction": None,
                "components": None, "boxes": [], "max_score": None, "verdict": None, "defect_score": None,
                "status": "error", "error": error}
    h, w = pred.mask.shape
    row = {"query": name, "file": str(path), "width": w, "height": h,
           "defect_fraction": round(pred.defect_fraction, 6), "components": len(pred.boxes),
           "boxes": [list(b) for b in pred.boxes], "max_score": round(pred.max_score, 4),
           "verdict": pred.verdict, "defect_score": round(pred.defect_score, 4), "status": "ok", "error": ""}
    if _typed(pred):
        row["type"] = pred.type or ""
        row["types"] = {t: round(f, 6) for t, f in sorted(pred.fractions.items(), key=lambda kv: -kv[1])}
    return row


def query_outputs(name: str, rgb: np.ndarray, pred: Prediction) -> dict[str, bytes]:
    """The files of one query, relative to the output folder -> their encoded bytes."""
    if _typed(pred):
        from .multitype import label_png, typed_overlay
        return {f"masks/{name}.png": encode_png(pred.mask),
                f"scores/{name}.png": encode_png(np.round(pred.score * 255).astype(np.uint8)),
                f"labels/{name}.png": label_png(pred.labels, pred.types),
                f"overlays/{name}.jpg": encode_jpeg(typed_overlay(rgb, pred.labels, pred.types))}
    return {f"masks/{name}.png": encode_png(pred.mask),
            f"scores/{name}.png": encode_png(np.round(pred.score * 255).astype(np.uint8)),
            f"overlays/{name}.jpg": encode_jpeg(overlay(rgb, pred.mask))}


def segment_one(seg: FewShotSegmenter, name: str, file: str | Path,
                image: ImageLike | None = None) -> tuple[dict, dict[str, bytes]]:
    """Segment one query -> (summary row, its output files); a bad query -> (error row, {}).

    ``image`` is the query itself when it is not read from ``file`` (e.g. bytes a Ray reader read);
    ``file`` names it in the row and in errors. Both engines (local and Ray) go through here."""
    try:
        rgb = seg.load(file if image is None else image, name=str(file))
        pred = seg.predict(rgb)
        return _row(name, file, pred), query_outputs(name, rgb, pred)
    except FdsegError as e:
        return _row(name, file, None, str(e)), {}


def read_log(text: str) -> dict[str, dict]:
    """``summary.jsonl`` text -> {query name: row}; a torn last line (killed mid-write) is ignored."""
    done: dict[str, dict] = {}
    for ln in text.splitlines():
        try:
            r = json.loads(ln)
            done[r["query"]] = r
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def segment_folder(seg: FewShotSegmenter, queries: list[Path], out: str | Path, *, progress: bool = True,
                   resume: bool = False, supports: list[tuple[Path, Path]] | None = None) -> FolderResult:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names(queries)
    log_path = out / "summary.jsonl"
    done = read_log(log_path.read_text()) if resume and log_path.exists() else {}
    write_text(log_path, "".join(json.dumps(r) + "\n" for r in done.values()))
    todo = [(n, q) for n, q in zip(names, queries) if n not in done or done[n]["status"] != "ok"]
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(queries), initial=len(queries) - len(todo), desc="segment", unit="img", dynamic_ncols=True)
    with open(log_path, "a", encoding="utf-8") as log:
        # predict_stream decodes ahead and batches the backbone; it yields in input order
        for (name, q), (_, res) in zip(todo, seg.predict_stream([q for _, q in todo])):
            try:
                if isinstance(res, BaseException):
                    raise res
                rgb = res.image if res.image is not None else seg.load(q)
                files, row = query_outputs(name, rgb, res), _row(name, q, res)
            except FdsegError as e:
                files, row = {}, _row(name, q, None, str(e))
            for rel, data in files.items():
                write_bytes(out / rel, data)
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
    typed = [f for f in TYPE_FIELDS if any(f in r for r in rows)]
    w = csv.DictWriter(buf, fieldnames=FIELDS + typed)
    w.writeheader()
    for r in rows:
        w.writerow({**r, "boxes": json.dumps(r["boxes"]),
                    **({"types": json.dumps(r["types"])} if "types" in r else {})})
    write_text(out / "summary.csv", buf.getvalue())


def _write_report(out: Path, rows: list[dict], seg: FewShotSegmenter, supports: list[tuple[Path, Path]]) -> Path:
    from .data.images import load_image, load_mask
    d = seg.describe()
    types = list(getattr(seg, "types", ()) or ()) if seg.n_supports else []
    skip = ("plan", "explain", "type_plans")
    secs = [f"<p class='muted'>settings: {esc(json.dumps({k: v for k, v in d.items() if k not in skip}))}</p>"]
    if types:
        from .multitype import legend
        entries = legend(types)
        write_text(out / "labels" / "legend.json", json.dumps({"good": 0, "types": entries}, indent=1))
        count = {t: sum(1 for r in rows if r.get("type") == t) for t in types}
        secs.append("<h2>Defect types</h2><p class='muted'>labels/STEM.png: value k = type k (0 = good); "
                    "overlays coloured by type; labels/legend.json</p><table><tr><th>value</th><th>type</th>"
                    "<th>colour</th><th>queries of this type (strongest defect)</th></tr>" + "".join(
                        f"<tr><td>{e['value']}</td><td>{esc(e['type'])}</td><td><span style='display:inline-block;"
                        f"width:1.2em;height:1em;background:{e['colour']}'></span> {e['colour']}</td>"
                        f"<td>{count[e['type']]}</td></tr>" for e in entries) + "</table>")
        plans = [(f"{t}: ", p) for t, p in seg.plans.items()]
    else:
        plans = [("", seg.plan)] if seg.n_supports else []
    for label, plan in plans:
        secs.append(f"<h2>Plan{(' of ' + esc(label[:-2])) if label else ''}</h2><p class='muted'>what the fit "
                    f"decided on the supports, and why</p><ul>" +
                    "".join(f"<li><b>{esc(x.step)}</b> = {esc(str(x.value))}: {esc(x.reason)}</li>"
                            for x in plan.decisions) + "</ul>")
    if supports:
        cards = []
        colours = {}
        if types:
            from .multitype import type_colours
            colours = dict(zip(types, type_colours(len(types))))
        for i, sup in enumerate(supports):
            im, m = sup[0], sup[1]
            kind = sup[2] if len(sup) > 2 else None
            rgb = load_image(im)
            rel = f"supports/support_{i + 1}.jpg"
            write_jpeg(out / rel, overlay(rgb, load_mask(m, size=rgb.shape[:2]), colours.get(kind, GREEN)))
            cards.append(card(rel, f"support {i + 1}: {Path(im).name}" + (f" ({kind})" if kind else "")))
        secs.append("<h2>Supports</h2><div class='grid'>" + "".join(cards) + "</div>")
    ok = sorted((r for r in rows if r["status"] == "ok"),
                key=lambda r: (r.get("verdict") != "defective", -r["defect_fraction"], r["query"]))
    bad = [r for r in rows if r["status"] != "ok"]
    n_def = sum(1 for r in ok if r.get("verdict") == "defective")
    typed = [["type"]] if types else [[]]
    secs.append(f"<h2>Queries</h2><p class='muted'>{n_def} of {len(ok)} judged defective (a mask component of at "
                f"least one grid cell; defect score = the largest margin above the threshold)</p>" + table(
        ["query", "verdict", *typed[0], "defect score", "defect area", "components", "max score", "status"],
        [[r["query"], r.get("verdict", "-"), *([r.get("type") or "-"] if types else []), r.get("defect_score", "-"),
          f"{100 * r['defect_fraction']:.3f}%", r["components"], r["max_score"], "ok"] for r in ok] +
        [[r["query"], "-", *(["-"] if types else []), "-", "-", "-", "-", r["error"]] for r in bad]))
    secs.append("<h2>Overlays (most defective first)</h2><div class='grid'>" + "".join(
        card(f"overlays/{r['query']}.jpg", f"{r['query']}: {r.get('verdict', '-')}, {100 * r['defect_fraction']:.3f}% "
                                            f"defect, max score {r['max_score']}") for r in ok) + "</div>")
    return write_page(out / "report.html", "fdseg segmentation", secs)
