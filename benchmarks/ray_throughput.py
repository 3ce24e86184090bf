"""Throughput of ``segment --engine ray`` (1 and 2 actors) against the local engine, in one run.

    .venv/bin/python benchmarks/ray_throughput.py --data ../shared/data/defects --n 16 64 --rounds 2

Every configuration segments the first N queries of sd_saliency_900 (200 x 200 steel images,
one support) for each N, writing all outputs (masks, scores, overlays, summaries, report)
to a fresh folder; configurations are interleaved round by round so that load from other
work on a shared machine falls on all of them alike. From two sizes N1 < N2 each
configuration gets a per-image time (the slope, (t(N2) - t(N1)) / (N2 - N1)) and a fixed
cost (the intercept: Ray's actor start, shipping the fitted segmenter, pipeline start-up);
Ray's per-image overhead is its slope minus the local slope at the same torch thread count.
Ray runs only for the Ray configurations (started once per round; its start-up time is reported
separately), so that its idle threads and processes do not count against the local engine.

Wall-clock times on a machine shared with other work measure the other work too, so the
script also counts CPU time: that of this process and of every process it started (the
Ray head, its workers and actors), sampled from /proc every 0.1 s so that actors which
exit at the end of a run are counted. CPU seconds per image do not depend on how many
other processes wait for the same cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

import fdseg
from fdseg.segment_folder import segment_folder
from fdseg.segment_ray import segment_ray


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float, int]]:
    """pid -> (parent pid, user + system CPU seconds, start time in ticks) for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
                out[int(d)] = (int(st[1]), (int(st[11]) + int(st[12])) / _TICK, int(st[19]))
            except (OSError, IndexError, ValueError):
                pass
    return out


class CpuMeter:
    """CPU seconds used by this process and all its descendants between start() and stop()."""

    def __init__(self, period: float = 0.1):
        self.period, self._stop = period, threading.Event()

    def _scan(self) -> None:
        table = _proc_table()
        tree, todo = set(), [os.getpid()]
        while todo:
            pid = todo.pop()
            tree.add(pid)
            todo.extend(c for c, (pp, _, _) in table.items() if pp == pid and c not in tree)
        for pid in tree:
            _, cpu, start = table[pid]
            key = (pid, start)
            self.first.setdefault(key, cpu if self._baseline else 0.0)
            self.last[key] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._scan()
        self._own = time.thread_time()          # the sampling itself is not part of the work

    def start(self) -> "CpuMeter":
        self.first, self.last, self._baseline = {}, {}, True
        self._scan()
        self._baseline = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._own = 0.0
        self._t.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        self._scan()
        return sum(self.last[k] - self.first[k] for k in self.last) - self._own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/defects")
    ap.add_argument("--dataset", default="sd_saliency_900")
    ap.add_argument("--n", type=int, nargs=2, default=[16, 64], metavar=("N1", "N2"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", default=None, help="also write the raw timings here")
    a = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")     # single node, loopback only
    root = Path(a.data) / a.dataset
    imgs = sorted(p for c in sorted(root.iterdir()) for p in sorted((c / "images").iterdir()))
    support = imgs[0]
    queries = imgs[1:1 + max(a.n)]
    seg = fdseg.FewShotSegmenter().fit([support], [support.parent.parent / "masks" / f"{support.stem}.png"])

    import ray
    ray_starts = []

    def local(threads):
        def run(qs, out):
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                assert not segment_folder(seg, qs, out, progress=False).errors
            finally:
                torch.set_num_threads(old)
        return run

    def on_ray(actors):
        def run(qs, out):
            res = segment_ray(seg, qs, out, actors=actors, cpus_per_actor=1, batch_size=a.batch_size, progress=False)
            assert res.computed == len(qs) and not res.errors
        return run

    configs = {"local, 1 thread": local(1), "local, 2 threads": local(2),
               "ray, 1 actor x 1 thread": on_ray(1), "ray, 2 actors x 1 thread": on_ray(2)}
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in a.n} for k in configs}
    cpus: dict[str, dict[int, list[float]]] = {k: {n: [] for n in a.n} for k in configs}
    loads = []
    with tempfile.TemporaryDirectory(prefix="fdseg-raybench-") as tmp:
        for r in range(a.rounds):
            for name, run in configs.items():
                # the local engine runs with no Ray at all (Ray's idle threads and processes use CPU too)
                if name.startswith("ray") and not ray.is_initialized():
                    t = time.perf_counter()
                    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
                    ray_starts.append(time.perf_counter() - t)
                    with tempfile.TemporaryDirectory() as warm:   # Ray starts its worker pool on first use
                        on_ray(2)(queries[:4], Path(warm) / "out")
                elif not name.startswith("ray") and ray.is_initialized():
                    ray.shutdown()
                for n in a.n:
                    out = Path(tmp) / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    loads.append(os.getloadavg()[0])
                    meter = CpuMeter().start()
                    t = time.perf_counter()
                    run(queries[:n], out)
                    times[name][n].append(time.perf_counter() - t)
                    cpus[name][n].append(meter.stop())
                    print(f"round {r + 1} {name:26s} N={n:3d}: {times[name][n][-1]:6.2f} s, "
                          f"{cpus[name][n][-1]:6.2f} CPU s", flush=True)
    ray.shutdown()
    ray_start = statistics.median(ray_starts)

    n1, n2 = a.n
    res = {}
    for name, tn in times.items():
        t1, t2 = statistics.median(tn[n1]), statistics.median(tn[n2])
        slope = (t2 - t1) / (n2 - n1)
        c1, c2 = statistics.median(cpus[name][n1]), statistics.median(cpus[name][n2])
        cslope = (c2 - c1) / (n2 - n1)
        res[name] = {"t_n1": t1, "t_n2": t2, "s_per_img": slope, "fixed_s": t1 - slope * n1,
                     "img_per_s_at_n2": n2 / t2, "steady_img_per_s": 1 / slope if slope > 0 else float("inf"),
                     "cpu_n2": c2, "cpu_s_per_img": cslope, "cpu_fixed_s": c1 - cslope * n1}
    base = res["local, 1 thread"]
    print(f"\nCPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, ray {ray.__version__}; "
          f"ray.init (median): {ray_start:.1f} s; load average during the run: median {statistics.median(loads):.1f} "
          f"(min {min(loads):.1f}, max {max(loads):.1f}); medians of {a.rounds} rounds\n")
    print(f"| engine | {n2} images | images/s at N={n2} | per image (slope) | steady images/s | fixed cost "
          f"| vs local 1 thread |")
    print("|---|---|---|---|---|---|---|")
    for name, v in res.items():
        print(f"| {name} | {v['t_n2']:.1f} s | {v['img_per_s_at_n2']:.2f} | {1000 * v['s_per_img']:.0f} ms "
              f"| {v['steady_img_per_s']:.2f} | {v['fixed_s']:.1f} s "
              f"| x{v['img_per_s_at_n2'] / base['img_per_s_at_n2']:.2f} at N={n2}, "
              f"x{base['s_per_img'] / v['s_per_img']:.2f} steady |")
    print(f"\n| engine | CPU s for {n2} images | CPU per image (slope) | fixed CPU s | CPU per image vs local 1 thread |")
    print("|---|---|---|---|---|")
    for name, v in res.items():
        print(f"| {name} | {v['cpu_n2']:.1f} | {1000 * v['cpu_s_per_img']:.0f} ms | {v['cpu_fixed_s']:.1f} "
              f"| x{v['cpu_s_per_img'] / base['cpu_s_per_img']:.2f} |")
    r1, r2 = res["ray, 1 actor x 1 thread"], res["ray, 2 actors x 1 thread"]
    print(f"\n2 actors / 1 actor: x{r2['img_per_s_at_n2'] / r1['img_per_s_at_n2']:.2f} at N={n2}, "
          f"x{r1['s_per_img'] / r2['s_per_img']:.2f} steady; Ray overhead per image (1 actor vs local, 1 thread): "
          f"{1000 * (r1['s_per_img'] - base['s_per_img']):+.0f} ms; Ray fixed cost per run: "
          f"{r1['fixed_s'] - base['fixed_s']:+.1f} s")
    print(f"CPU per image: Ray 1 actor {1000 * (r1['cpu_s_per_img'] - base['cpu_s_per_img']):+.0f} ms vs local "
          f"1 thread, Ray 2 actors / 1 actor x{r2['cpu_s_per_img'] / r1['cpu_s_per_img']:.2f}; fixed CPU per run: "
          f"Ray 1 actor {r1['cpu_fixed_s'] - base['cpu_fixed_s']:+.1f} s vs local")
    if a.json:
        Path(a.json).write_text(json.dumps({"times": times, "cpu": cpus, "results": res, "ray_init_s": ray_start,
                                            "loadavg": loads}, indent=1))


if __name__ == "__main__":
    main()
