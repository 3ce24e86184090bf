"""The cascade (``preset="line"``, :mod:`fdseg.cascade`) on seeded production-line streams of real images,
against the accurate path alone, ``fast`` and the paper's loop in the same run.

    .venv/bin/python benchmarks/stream.py run --out stream-n50 --shots 1 5 --threads 1       # resumable
    .venv/bin/python benchmarks/stream.py run --out stream-s0 --normals 0 --shots 5 ...       # bound from supports
    .venv/bin/python benchmarks/stream.py report stream-n50 [stream-s0 ...]                   # the tables
    .venv/bin/python benchmarks/stream.py curve stream-n50                                    # the trade-off curve

**Streams.** Per class and shot count K (seed ``--seed``): K supports drawn from the class's defect images
(``shared/data/defects``, ``shared/data/transfer``), the rest are defect queries; good queries from the
class's defect-free pool (``shared/data/distill``, restored to the source size as ``fdseg bench`` does,
or the transfer class's ``normals/``), never among the ``--normals`` normals given to ``fit`` (evenly
spread over the pool, at most 5/8 of it). A pool of ``95`` good and ``20`` defect queries is drawn once;
the 95/5 stream is 95 good + 5 defect of it, the 80/20 stream 80 + 20 (``--queries 100``), each shuffled
(seeded); a pool that runs short gives a shorter stream at the same mix.

**Run.** The cascade is fitted once (supports, normals); the accurate path alone is the same fit's
accurate part (``CascadeSegmenter.accurate()``: the same masks it would give on its own), ``fast`` its first
pass alone. Every query of the pool goes through each of the three (``predict_stream``, batch 1, each
query's time taken between results), interleaved in chunks of 10 so a changing load touches all three
alike, after one warm-up query each. The paper's loop (``benchmarks/presets_speed.py``: supports
re-extracted for every query, fp32, the unfused backbone) runs on the first ``--loop`` queries. A stream's
throughput is its queries over the sum of their times.

**Report** per stream (class, K, mix) and pooled per dataset and overall: throughput of the cascade /
accurate / fast / paper loop and the ratios, the share of queries escalated, verdict agreement with the
accurate path, missed = defect images the cascade calls OK and the accurate path flags (count / defect
images), and whether every escalated query's mask and score are byte-identical to the accurate path's.

**Curve**: the same records replayed with other bounds (the held-out pairs are in each fit's record): the
share answered, agreement, missed and the throughput they would give (time = the first pass's on every
query + the accurate path's on the escalated ones, no feature sharing counted: conservative).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# the classes with defect-free images
DISTILL_CLASSES = ["magnetic_tile/blowhole", "magnetic_tile/break", "magnetic_tile/crack", "magnetic_tile/fray",
                   "magnetic_tile/uneven", "visa/capsules", "visa/macaroni1_chip_around_edge_and_corner",
                   "visa/macaroni1_different_colour_spot", "visa/macaroni1_middle_breakage",
                   "visa/macaroni1_similar_colour_spot", "visa/macaroni1_small_cracks",
                   "visa/macaroni1_small_scratches", "bsdata/pitting"]
TRANSFER_CLASSES = ["kolektorsdd/commutator", "dagm/class1"]
ALL_CLASSES = DISTILL_CLASSES + TRANSFER_CLASSES
DEFAULT_CLASSES = ["magnetic_tile/blowhole", "magnetic_tile/crack", "magnetic_tile/uneven", "visa/capsules",
                   "visa/macaroni1_small_scratches", "visa/macaroni1_chip_around_edge_and_corner", "bsdata/pitting",
                   "kolektorsdd/commutator", "dagm/class1"]
MIXES = (0.95, 0.80)


# ------------------------------------------------------------------------------------------------ streams

@dataclass
class Pool:
    name: str                          # DATASET/CLASS
    shots: int
    supports: list[Path]
    masks: list[Path]
    normals: list[Path]                # for fit ([]: none)
    goods: list[Path]                  # good queries, in draw order
    defects: list[Path]                # defect queries, in draw order
    spare_goods: list[Path] = field(default_factory=list)   # good images in neither (warm-up, tests)
    seed: int = 0

    def stream(self, good_share: float, n_queries: int = 100) -> list[int]:
        """Indices into :attr:`queries` (goods first, then defects) of the stream at this mix, shuffled."""
        n_def = max(1, round(n_queries * (1 - good_share)))
        n_good = n_queries - n_def
        if n_def > len(self.defects):
            n_def = len(self.defects)
            n_good = round(n_def * good_share / (1 - good_share))
        if n_good > len(self.goods):
            n_good = len(self.goods)
            n_def = max(1, min(n_def, round(n_good * (1 - good_share) / good_share)))
        idx = list(range(n_good)) + [len(self.goods) + j for j in range(n_def)]
        random.Random(f"stream/{self.seed}/{self.name}/{self.shots}/{good_share}").shuffle(idx)
        return idx

    @property
    def queries(self) -> list[Path]:
        return self.goods + self.defects

    @property
    def defective(self) -> list[bool]:
        return [False] * len(self.goods) + [True] * len(self.defects)


_CATS: dict = {}


def _catalogs(shared: Path):
    if str(shared) not in _CATS:
        from fdseg.data import scan
        from fdseg.normals import NormalPool
        _CATS[str(shared)] = {"defects": (scan(shared / "defects"), NormalPool.scan(shared / "distill")),
                              "transfer": (scan(shared / "transfer"), NormalPool.scan(shared / "transfer"))}
    return _CATS[str(shared)]


def make_pool(name: str, shots: int, *, n_goods: int = 95, n_defects: int = 20, n_normals: int = 50, seed: int = 0,
              shared: Path = SHARED, cache: Path | None = None) -> Pool:
    """The class's supports, normals and query pool (module doc); ``n_normals=0``: no normals."""
    from fdseg.normals import evenly
    ds, cls = name.split("/", 1)
    cat, npool = _catalogs(Path(shared))["transfer" if name in TRANSFER_CLASSES else "defects"]
    samples = sorted(cat.classes[ds][cls], key=lambda s: s.image.name)
    evaluated = {s.image.resolve() for s in samples}
    goods = [p for p in npool.files(ds, cls) if p.resolve() not in evaluated]
    if not goods:
        raise ValueError(f"no defect-free images for {name}")
    rng = random.Random(f"stream/{seed}/{name}/{shots}")
    sup = rng.sample(samples, shots)
    rest = [s for s in samples if s not in sup]
    n_norm = min(n_normals, (len(goods) * 5) // 8)
    normals = evenly(goods, n_norm) if n_norm else []
    taken = {p.resolve() for p in normals}
    free = [p for p in goods if p.resolve() not in taken]
    good_q = rng.sample(free, min(n_goods, len(free)))
    def_q = rng.sample(rest, min(n_defects, len(rest)))
    spare = [p for p in free if p not in good_q]
    cache = Path(cache or Path("/tmp") / "fdseg_stream_pool")
    cache.mkdir(parents=True, exist_ok=True)
    restore = lambda ps: npool.restore(ps, cache) if ps else []    # noqa: E731
    return Pool(name, shots, [s.image for s in sup], [s.mask for s in sup], restore(normals), restore(good_q),
                [s.image for s in def_q], restore(spare[:4]), seed)


# ------------------------------------------------------------------------------------------------ run

def _timed(seg, images) -> tuple[list, list[float]]:
    """Predictions of ``images`` (predict_stream) and each one's seconds (between results)."""
    preds, secs = [], []
    t = time.perf_counter()
    for _, res in seg.predict_stream(images):
        if isinstance(res, BaseException):
            raise res
        now = time.perf_counter()
        preds.append(res)
        secs.append(now - t)
        t = now
    return preds, secs


def run_one(name: str, shots: int, a) -> dict:
    import torch
    from fdseg import FewShotSegmenter
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from presets_speed import paper_loop
    pool = make_pool(name, shots, n_normals=a.normals, seed=a.seed)
    seg = FewShotSegmenter(preset="line", batch_size=1, cascade=a.cascade)
    t = time.perf_counter()
    seg.fit(pool.supports, pool.masks, normals=pool.normals or None)
    fit_s = time.perf_counter() - t
    acc, fast = seg.accurate(), seg.first_pass()
    plain = FewShotSegmenter(batch_size=1)          # the fit of the accurate path alone, for its fit time
    t = time.perf_counter()
    plain.fit(pool.supports, pool.masks, normals=pool.normals or None)
    fit_acc_s = time.perf_counter() - t
    del plain
    warm = pool.spare_goods[:1] or pool.goods[:1]
    for s in (acc, seg, fast):
        list(s.predict_stream(warm))
    qs = pool.queries
    res = {"accurate": ([], []), "cascade": ([], []), "fast": ([], [])}
    order = [("accurate", acc), ("cascade", seg), ("fast", fast)]
    for c, i in enumerate(range(0, len(qs), a.chunk)):
        chunk = qs[i:i + a.chunk]
        for key, s in (order if c % 2 == 0 else order[::-1]):
            p, ts = _timed(s, chunk)
            res[key][0].extend(p)
            res[key][1].extend(ts)
    loop_s, loop_n = 0.0, min(a.loop, len(qs))
    if loop_n:
        loop = paper_loop("cpu")
        order_q = pool.stream(MIXES[0])[:loop_n]
        t = time.perf_counter()
        for j in order_q:
            loop.fit(pool.supports, pool.masks)
            loop.predict(qs[j])
        loop_s = time.perf_counter() - t
    queries = []
    for j, (q, d) in enumerate(zip(qs, pool.defective)):
        pa, pc, pf = res["accurate"][0][j], res["cascade"][0][j], res["fast"][0][j]
        stage = getattr(pc, "stage", "accurate")
        same = None
        if stage == "accurate":
            same = bool(np.array_equal(pc.mask, pa.mask) and pc.defect_score == pa.defect_score
                        and np.array_equal(pc.margin_grid, pa.margin_grid) and pc.is_defective == pa.is_defective)
        queries.append({"file": str(q), "defective": d, "stage": stage, "identical": same,
                        "v_acc": bool(pa.is_defective), "v_casc": bool(pc.is_defective),
                        "v_fast": bool(pf.is_defective),
                        "s_acc": float(pa.defect_score), "s_first": float(pf.defect_score),
                        "t_acc": res["accurate"][1][j], "t_casc": res["cascade"][1][j], "t_fast": res["fast"][1][j]})
    b = seg.bound
    return {"class": name, "shots": shots, "normals": len(pool.normals), "seed": a.seed, "cascade_mode": a.cascade,
            "fit_s": fit_s, "fit_accurate_s": fit_acc_s, "zoom": seg.preprocess.zoom,
            "plan": str(seg.plan), "bound": b.as_dict() if b else None,
            "streams": {str(m): pool.stream(m, a.queries) for m in MIXES},
            "loop": {"queries": loop_n, "seconds": loop_s}, "queries": queries,
            "torch_threads": torch.get_num_threads()}


def cmd_run(a) -> None:
    import torch
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in a.classes:
        for k in a.shots:
            f = out / f"{name.replace('/', '__')}__{k}.json"
            if f.exists():
                continue
            t = time.time()
            rec = run_one(name, k, a)
            f.write_text(json.dumps(rec))
            s = summarise([rec])
            for (kk, mix), row in sorted(s["overall"].items()):
                print(f"{name} K{k} {mix}: " + fmt_row(row), flush=True)
            print(f"  {name} K{k} done in {time.time() - t:.0f} s; bound: {rec['plan'].splitlines()[-1][:160]}",
                  flush=True)


# ------------------------------------------------------------------------------------------------ report

def _load(dirs) -> list[dict]:
    recs = []
    for d in dirs:
        for f in sorted(Path(d).glob("*.json")):
            recs.append(json.loads(f.read_text()))
    return recs


def _overhead(rec: dict) -> float:
    """Seconds the first pass adds to an escalated query in this fit's run (median; the whole first pass
    where none ran)."""
    b = rec["bound"] or {}
    ext = [q["t_casc"] - q["t_acc"] for q in rec["queries"] if q["stage"] == "accurate"]
    if rec.get("cascade_mode") == "off" or not b.get("active") or not ext:
        return float(np.median([q["t_fast"] for q in rec["queries"]]))
    return float(np.median(ext))


def _auto_off(rec: dict) -> bool:
    """Whether ``cascade="auto"`` skips the first pass for this fit: its bound answered less than twice its
    cost (:meth:`fdseg.cascade.CascadeSegmenter._worth`) of the fit's held-out good images (or of its
    left-out supports' good surface)."""
    b = rec["bound"] or {}
    ans, n = b.get("answered", [0, 0])
    if not b.get("active") or not n:
        return True
    cost = b.get("cost")
    if cost is None:          # a record without the fit's timing: the run's own medians stand in for it
        cost = np.median([q["t_fast"] for q in rec["queries"]]) / np.median([q["t_acc"] for q in rec["queries"]])
    return ans / n < 2 * cost


def _stream_rows(rec: dict, mix: str, rule=None, auto: bool = False) -> dict:
    """One stream's sums. ``rule(rec, q) -> answered`` replays another bound: an answered query costs what
    the run's first pass cost it (or ``fast`` alone), an escalated one what the run's cascade cost it (or
    the accurate path's time + the first pass's measured overhead). ``auto``: the run as
    ``cascade="auto"`` would have gone (the accurate path alone where its bound answered no held-out image)."""
    qs = [rec["queries"][i] for i in rec["streams"][mix]]
    r = defaultdict(float)
    over = _overhead(rec) if rule is not None else 0.0
    off = auto and _auto_off(rec)
    for q in qs:
        if rule is None:
            answered = q["stage"] != "accurate" and not off
            v = False if answered else q["v_acc"] if off else q["v_casc"]
            r["t_casc"] += q["t_acc"] if off else q["t_casc"]
        else:
            answered = rule(rec, q)
            v = False if answered else q["v_acc"]
            ran = q["stage"] != "accurate"
            if answered:
                r["t_casc"] += q["t_casc"] if ran else q["t_fast"]
            else:
                r["t_casc"] += q["t_casc"] if not ran else q["t_acc"] + over
        r["n"] += 1
        r["n_def"] += q["defective"]
        r["escalated"] += not answered
        r["agree"] += v == q["v_acc"]
        r["missed"] += bool(q["defective"] and answered and q["v_acc"])
        r["answered_good"] += bool(answered and not q["defective"])
        r["goods"] += not q["defective"]
        r["not_identical"] += bool(q["identical"] is False)
        r["t_acc"] += q["t_acc"]
        r["t_fast"] += q["t_fast"]
        r["fast_agree"] += q["v_fast"] == q["v_acc"]
        r["fast_missed"] += bool(q["defective"] and not q["v_fast"] and q["v_acc"])
    lp = rec["loop"]
    if lp["queries"]:
        r["loop_qps_x_n"] += lp["queries"] / lp["seconds"] * r["n"]     # the loop's q/s, weighted by queries
    return r


def _add(into: dict, r: dict) -> None:
    for k, v in r.items():
        into[k] = into.get(k, 0.0) + v


def summarise(recs: list[dict], rule=None, auto: bool = False) -> dict:
    per, by_ds, overall = {}, defaultdict(dict), defaultdict(dict)
    for rec in recs:
        for mix in rec["streams"]:
            r = _stream_rows(rec, mix, rule, auto)
            per[(rec["class"], rec["shots"], mix)] = r
            _add(by_ds[(rec["class"].split("/")[0], rec["shots"], mix)], r)
            _add(overall[(rec["shots"], mix)], r)
    return {"per": per, "datasets": dict(by_ds), "overall": dict(overall)}


def fmt_row(r: dict) -> str:
    n = r["n"]
    qa, qc, qf = n / r["t_acc"], n / r["t_casc"], n / r["t_fast"]
    loop = r.get("loop_qps_x_n", 0) / n if r.get("loop_qps_x_n") else float("nan")
    return (f"n {n:.0f} ({r['n_def']:.0f} defect) | q/s cascade {qc:.2f} accurate {qa:.2f} fast {qf:.2f} "
            f"loop {loop:.2f} | "
            f"cascade x{qc / qa:.2f} accurate, x{qc / qf:.2f} fast, x{qc / loop:.2f} loop | escalated "
            f"{r['escalated'] / n:.1%} | agree {r['agree'] / n:.1%} | missed {r['missed']:.0f}/{r['n_def']:.0f} | "
            f"not identical {r['not_identical']:.0f}")


def md_row(label: str, r: dict) -> str:
    n = r["n"]
    qa, qc, qf = n / r["t_acc"], n / r["t_casc"], n / r["t_fast"]
    loop = r.get("loop_qps_x_n", 0) / n if r.get("loop_qps_x_n") else float("nan")
    return (f"| {label} | {n:.0f} ({r['n_def']:.0f}) | {qc:.2f} | x{qc / qa:.2f} | x{qc / qf:.2f} | x{qc / loop:.2f} | "
            f"x{qa / loop:.2f} | {r['escalated'] / n:.1%} | {r['agree'] / n:.1%} | "
            f"{r['missed']:.0f} / {r['n_def']:.0f} | "
            f"{'yes' if r['not_identical'] == 0 else 'NO (%d)' % r['not_identical']} | "
            f"{r['fast_agree'] / n:.1%}, {r['fast_missed']:.0f} |")


MD_HEAD = ("| stream | queries (defect) | cascade q/s | vs accurate | vs fast | vs paper loop | accurate vs loop | "
           "escalated | verdicts agree | missed / defect images | escalated masks identical | "
           "fast alone: agree, missed |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|---|")


def cmd_report(a) -> None:
    recs = _load(a.dirs)
    s = summarise(recs, auto=a.auto)
    print(MD_HEAD)
    for (k, mix), r in sorted(s["overall"].items()):
        print(md_row(f"**all, {k}-shot, {float(mix):.0%} good**", r))
    for (ds, k, mix), r in sorted(s["datasets"].items()):
        print(md_row(f"{ds}, {k}-shot, {float(mix):.0%}", r))
    if a.per_class:
        for (c, k, mix), r in sorted(s["per"].items()):
            print(md_row(f"{c}, {k}-shot, {float(mix):.0%}", r))
    print()
    print("| fit | zoom | bound | pairs | delta | level | held-out answered | fit s (accurate alone) |")
    print("|---|---|---|---|---|---|---|---|")
    for rec in recs:
        b = rec["bound"] or {}
        ans = b.get("answered", [0, 0])
        delta = b.get("delta")
        print(f"| {rec['class']} {rec['shots']}-shot, {rec['normals']} normals | {rec['zoom']} | "
              f"{'on' if b.get('active') else 'off'} ({b.get('source')}) | {b.get('pairs')} | "
              f"{'-' if delta is None else f'{delta:+.3f}'} | {b.get('level', 0):+.3f} | {ans[0]}/{ans[1]} | "
              f"{rec['fit_s']:.1f} ({rec['fit_accurate_s']:.1f}) |")


def _rule(kind: str, value: float):
    """A replayed bound: answered where s_first + delta <= level, delta from the fit's pairs by ``kind``."""
    from scipy.stats import t

    def delta_of(rec):
        d = np.asarray(rec["bound"]["diffs"] if rec["bound"] else [], dtype=float)
        if kind == "fixed":
            return value
        if len(d) < 3:
            return None
        if kind == "max":
            return d.max() + value
        n = len(d)
        return max(d.max(), d.mean() + t.ppf(value, n - 1) * d.std(ddof=1) * math.sqrt(1 + 1 / n))

    cache = {}

    def rule(rec, q):
        if kind == "oracle-score":          # knows the accurate score: the ceiling of any bound on it
            return q["s_acc"] <= rec["bound"]["level"]
        if kind == "oracle-verdict":        # knows the accurate verdict: the ceiling of any first pass this cheap
            return not q["v_acc"]
        key = id(rec)
        if key not in cache:
            cache[key] = delta_of(rec)
        delta = cache[key]
        return delta is not None and q["s_first"] + delta <= rec["bound"]["level"] - 1e-5

    return rule


CURVE = [("oracle-verdict", 0), ("oracle-score", 0), ("t", 0.999), ("t", 0.99), ("t", 0.9), ("t", 0.5),
         ("max", 0.05), ("max", 0.0), ("fixed", 0.05),
         ("fixed", 0.0), ("fixed", -0.05)]


def cmd_curve(a) -> None:
    recs = _load(a.dirs)
    print("| bound (delta) | shots, mix | answered good | escalated | verdicts agree | missed / defect | "
          "throughput vs accurate (replayed) |")
    print("|---|---|---|---|---|---|---|")
    for kind, v in CURVE:
        label = {"t": f"{v:g} prediction bound", "max": f"largest pair + {v:g}", "fixed": f"fixed {v:+g}",
                 "oracle-score": "oracle: accurate score <= level (ceiling of a score bound)",
                 "oracle-verdict": "oracle: accurate verdict OK (ceiling of this first pass)"}[kind]
        s = summarise(recs, _rule(kind, v))
        for (k, mix), r in sorted(s["overall"].items()):
            print(f"| {label} | {k}-shot, {float(mix):.0%} | {r['answered_good'] / r['goods']:.1%} | "
                  f"{r['escalated'] / r['n']:.1%} | {r['agree'] / r['n']:.1%} | {r['missed']:.0f} / {r['n_def']:.0f} | "
                  f"x{r['t_acc'] / r['t_casc']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--classes", nargs="+", default=DEFAULT_CLASSES)
    r.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    r.add_argument("--normals", type=int, default=50,
                   help="normals given to fit (0: none; the bound from the supports)")
    r.add_argument("--queries", type=int, default=100)
    r.add_argument("--loop", type=int, default=10, help="queries of the paper's loop per fit")
    r.add_argument("--chunk", type=int, default=10)
    r.add_argument("--cascade", default="auto", choices=["auto", "on", "off"])
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    rp = sub.add_parser("report")
    rp.add_argument("dirs", nargs="+")
    rp.add_argument("--per-class", action="store_true")
    rp.add_argument("--auto", action="store_true", help="as cascade=auto would have run (runs made with --cascade on)")
    c = sub.add_parser("curve")
    c.add_argument("dirs", nargs="+")
    a = ap.parse_args()
    {"run": cmd_run, "report": cmd_report, "curve": cmd_curve}[a.cmd](a)


if __name__ == "__main__":
    main()

