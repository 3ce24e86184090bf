"""The README's commands work as written, and its links resolve.

* every `fdseg ...` command in README.md's shell blocks parses with fdseg's own argument parser
  (sub-command, flags and their choices), and every `fdseg ...` command in docs/*.md and BENCHMARKS.md
  names a real sub-command and real flags of it;
* `make demo`'s command (read from the Makefile) runs and segments the shipped demo set;
* the README's Python example runs as written (from the repository root) on the demo images;
* every relative link (and #anchor) in README.md, BENCHMARKS.md and docs/*.md points to a file (and heading).

`make test` itself is what CI runs (.ci/run).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex

import numpy as np
import pytest
from PIL import Image

from fdseg.cli import build_parser, main

from conftest import REPO, iou

DOCS = sorted((REPO / "docs").glob("*.md"))
# flags the README documents that the CLI is getting in the same change (issue 20: presets, --explain);
# a command using them is checked without them until they exist, and test_pending_flags_exist says so


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S)


def fdseg_commands(text: str) -> list[list[str]]:
    """The `fdseg ...` command lines of a markdown text's shell blocks, as argv lists (without 'fdseg')."""
    out = []
    for block in _shell_blocks(text):
        block = re.sub(r"\\\n\s*", " ", block)                     # join continued lines
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()                  # drop comments
            if line.startswith("#"):
                continue
            # fdseg, .venv/bin/fdseg, also after env settings / nice: `OMP_NUM_THREADS=1 nice fdseg bench`
            m = re.search(r"(?:^|\s)(?:[\w.\-]*/)*fdseg ([a-z][\w-]*.*)$", line)
            if m:
                out.append(shlex.split(m.group(1), comments=False))
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    act = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(act.choices)


def _option_strings(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


README = (REPO / "README.md").read_text()
README_COMMANDS = fdseg_commands(README)


def test_readme_shows_the_main_commands():
    subs = {argv[0] for argv in README_COMMANDS}
    assert {"segment", "bench", "serve", "list"} <= subs, subs
    assert README.lstrip().startswith("# ") and "make demo" in README[:400] and "make test" in README[:400]
    assert len(README.encode()) < 12_000, "README.md must stay under 12 KB: move detail to docs/"


@pytest.mark.parametrize("argv", README_COMMANDS, ids=[" ".join(a[:2]) for a in README_COMMANDS])
def test_readme_command_parses(argv):
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as e:                                       # argparse reports on stderr and exits 2
        pytest.fail(f"README command does not parse: fdseg {' '.join(argv)} (exit {e.code})")


@pytest.mark.parametrize("path", [p for p in DOCS + [REPO / "BENCHMARKS.md"]], ids=lambda p: p.name)
def test_docs_commands_name_real_flags(path):
    """Commands in docs/ and BENCHMARKS.md may elide arguments (`...`), so only names are checked."""
    subs = _subparsers(build_parser())
    bad = []
    for argv in fdseg_commands(path.read_text()):
        if argv[0] not in subs:
            bad.append(f"fdseg {argv[0]}: no such command")
            continue
        known = _option_strings(subs[argv[0]])
        for tok in argv[1:]:
            flag = tok.strip("[]").split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                bad.append(f"fdseg {argv[0]} {flag}")
    assert not bad, f"{path.name}: {bad}"


def _make_recipe(target: str) -> list[str]:
    """The fdseg command of a Makefile target's recipe, as argv (without 'fdseg')."""
    text = (REPO / "Makefile").read_text()
    m = re.search(rf"^{target}:.*?\n((?:\t.*\n)+)", text, re.M)
    assert m, f"Makefile has no '{target}' target"
    recipe = re.sub(r"\\\n\s*", " ", m.group(1))
    line = next(ln for ln in recipe.splitlines() if "/fdseg " in ln)
    return shlex.split(line.split("/fdseg ", 1)[1])


def test_make_demo_segments_the_demo_set(tmp_path, monkeypatch):
    assert re.search(r"^test:", (REPO / "Makefile").read_text(), re.M), "make test is what CI runs"
    argv = _make_recipe("demo")
    i = argv.index("--out")
    argv[i + 1] = str(tmp_path / "demo-out")
    monkeypatch.chdir(REPO)                                       # the recipe's paths are relative
    assert main(argv + ["--no-progress", "--threads", "1"]) == 0
    out = tmp_path / "demo-out"
    queries = sorted(p.stem for p in (REPO / "demo/queries").iterdir())
    assert sorted(p.stem for p in (out / "masks").iterdir()) == queries
    assert (out / "report.html").is_file()
    rows = {r["query"]: r for r in json.loads((out / "summary.json").read_text())}
    # the blowholes are found where the ground truth has them (pooled IoU 0.43 when written), and the
    # two defect-free tiles stay (nearly) clean
    inter = union = 0
    for gt_path in sorted((REPO / "demo/ground_truth").glob("*.png")):
        gt = np.array(Image.open(gt_path)) > 0
        pred = np.array(Image.open(out / "masks" / f"{gt_path.stem}.png")) > 0
        inter += np.logical_and(gt, pred).sum()
        union += np.logical_or(gt, pred).sum()
    assert inter / union > 0.3
    for stem in queries:
        if stem.startswith("magnetic_tile_"):
            assert rows[stem]["defect_fraction"] < 1e-3


def _readme_python() -> str:
    return re.search(r"## Python API.*?```python\n(.*?)```", README, re.S).group(1)


def test_readme_python_example_runs(monkeypatch, capsys):
    monkeypatch.chdir(REPO)                                       # the example's paths are relative
    ns: dict = {}
    exec(compile(_readme_python(), "README.md", "exec"), ns)
    pred = ns["pred"]
    query = Image.open(REPO / "demo/queries/exp1_num_108889.jpg")
    gt = np.array(Image.open(REPO / "demo/ground_truth/exp1_num_108889.png")) > 0
    assert pred.mask.shape == pred.score.shape == (query.height, query.width)
    assert pred.mask.dtype == bool and 0.0 <= pred.score.min() and pred.score.max() <= 1.0
    assert np.array_equal(pred.mask, pred.score > 0.5)
    assert iou(pred.mask, gt) > 0.3
    for x0, y0, x1, y1 in pred.boxes:
        assert 0 <= x0 < x1 <= query.width and 0 <= y0 < y1 <= query.height
    printed = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in printed] == ["demo/queries/exp1_num_265077.jpg",
                                                 "demo/queries/exp1_num_290998.jpg"]


def test_readme_inspector_example_runs(tmp_path, monkeypatch, capsys):
    """The README's save / load block, after its API block, in a scratch folder (the demo linked in)."""
    (tmp_path / "demo").symlink_to(REPO / "demo")
    monkeypatch.chdir(tmp_path)
    block = re.search(r"## Fit once, run it on the line.*?```python\n(.*?)```", README, re.S).group(1)
    ns: dict = {}
    exec(compile(_readme_python(), "README.md", "exec"), ns)
    exec(compile(block, "README.md", "exec"), ns)
    assert (tmp_path / "line3.fdseg").is_file() and ns["line"].plan.summary() == ns["seg"].plan.summary()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("path", [REPO / "README.md", REPO / "BENCHMARKS.md"] + DOCS, ids=lambda p: p.name)
def test_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(target)
    assert not bad, f"{path.name}: broken links {bad}"
    if path.name == "README.md":                                 # every docs page is reachable from it
        linked = {(REPO / t.partition("#")[0]).resolve() for t in re.findall(r"\]\((docs/[^)\s]+)\)", text)}
        assert set(DOCS) <= linked, sorted(p.name for p in set(DOCS) - linked)
