"""Self-contained HTML reports (images referenced by relative path)."""
from __future__ import annotations

import html
from pathlib import Path

from ..atomic import write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px} h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 16px} td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:12px} .card{border:1px solid #ddd;padding:6px;border-radius:4px}
.card img{display:block;max-width:100%} .meta{font-size:12px;color:#555;margin-top:4px}
.bad{color:#b00} .muted{color:#777;font-size:13px}
"""


def esc(x) -> str:
    return html.escape(str(x))


def table(header: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{esc(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def card(img_rel: str, caption: str) -> str:
    return (f'<div class="card"><a href="{esc(img_rel)}"><img src="{esc(img_rel)}" loading="lazy"></a>'
            f'<div class="meta">{esc(caption)}</div></div>')


def page(title: str, sections: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>{''.join(sections)}</body></html>")


def write_page(path: str | Path, title: str, sections: list[str]) -> Path:
    path = Path(path)
    write_text(path, page(title, sections))
    return path
