"""Combine `fdseg bench` outputs of several backbones into one markdown table (BENCHMARKS.md).

    python benchmarks/backbones_table.py bench-bb/efficientnet_lite0-fm bench-bb/efficientnet_lite0-proto ...

Each folder is one `fdseg bench --backbone B --method M --shots 1 5` run. Rows = method x backbone;
columns = datasets, each "1-shot / 5-shot" mIoU (and a second table with FB-IoU); class-mean mIoU;
feature-path parameters. (Timing: backbones_speed.py; the bench's wall ms are blurred by its feature
cache, which serves a query that was another episode's support from memory.) The script refuses folders whose
episodes differ from the first one's (the comparison needs identical episodes).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def feature_params(backbone: str, weights: str | None = None) -> int:
    """Parameters on the path from the image to the tapped feature maps (heads excluded)."""
    import torch
    from fdseg import create_backbone
    bb = create_backbone(backbone, weights=weights)
    used: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: used.update(id(p) for p in mod.parameters(recurse=False)))
             for m in bb.modules()]
    with torch.inference_mode():
        bb(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    return sum(p.numel() for p in bb.parameters() if id(p) in used)


def partial_runs(d: Path, episodes: dict[int, list]) -> list[dict]:
    """Runs of an unfinished bench folder, from its per-episode log: only the datasets whose
    episodes are all done count; an unfinished run is flagged "partial" and gets no mean."""
    from fdseg.metrics import benchmark_mean, dataset_scores
    out = []
    for f in sorted((d / "runs").glob("*.jsonl")):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        key, recs = lines[0]["key"], {r["id"]: r for r in lines[1:]}
        eps = episodes[key["shots"]]
        done_ds = [ds for ds in sorted({e["dataset"] for e in eps})
                   if all(_ep_id(e) in recs for e in eps if e["dataset"] == ds)]
        scores = [dataset_scores(ds, sorted({e["cls"] for e in eps if e["dataset"] == ds}),
                                 [recs[_ep_id(e)] for e in eps if e["dataset"] == ds]) for ds in done_ds]
        n_done = sum(_ep_id(e) in recs for e in eps)
        out.append({"method": key["method"], "shots": key["shots"], "datasets": [s.as_dict() for s in scores],
                    "partial": f"{n_done}/{len(eps)} episodes" if n_done < len(eps) else None,
                    **benchmark_mean(scores)})
    return out


def _ep_id(e: dict) -> str:
    """fdseg.data.episodes.Episode.id of an episode as saved in episodes_Kshot.json."""
    return f"{e['dataset']}/{e['cls']}/{e['shots']}/{Path(e['query']).name}"


def main(dirs: list[str]) -> None:
    runs, episodes0 = [], {}
    for d in map(Path, dirs):
        eps = {}
        for k in (1, 5):
            f = d / f"episodes_{k}shot.json"
            if not f.is_file():
                continue
            ep = f.read_text()
            if episodes0.setdefault(k, ep) != ep:
                sys.exit(f"{d}: its {k}-shot episodes differ from the first folder's")
            eps[k] = json.loads(ep)["episodes"]
        if (d / "results.json").is_file():
            res = json.loads((d / "results.json").read_text())
            runs += [(res["segmenter"]["backbone"], r) for r in res["runs"]]
        else:
            key = json.loads((next((d / "runs").glob("*.jsonl"))).read_text().splitlines()[0])["key"]
            runs += [(key["segmenter"]["backbone"], r) for r in partial_runs(d, eps)]
    backbones = list(dict.fromkeys(bb for bb, _ in runs))
    params = {bb: feature_params(bb) for bb in backbones}
    datasets = sorted({x["dataset"] for _, r in runs for x in r["datasets"]})
    table: dict[tuple[str, str], dict[int, dict]] = {}
    for bb, r in runs:
        table.setdefault((r["method"], bb), {})[r["shots"]] = r
    for metric, title, mean_key, mean_title in (("miou", "mIoU", "class_mean_miou", "class-mean mIoU"),
                                                ("fbiou", "FB-IoU", "dataset_mean_fbiou", "dataset-mean FB-IoU")):
        print(f"\n{title} x 100, 1-shot / 5-shot:\n")
        print("| method | backbone | " + " | ".join(datasets) + f" | {mean_title} | params |")
        print("|" + "---|" * (len(datasets) + 4))
        for (m, bb), by_k in sorted(table.items()):
            cells = []
            for ds in datasets:
                v = []
                for k in (1, 5):
                    d = {x["dataset"]: x for x in by_k[k]["datasets"]}.get(ds) if k in by_k else None
                    v.append(f"{100 * d[metric]:.1f}" if d else "-")
                cells.append(" / ".join(v))
            cm = " / ".join(f"{100 * by_k[k][mean_key]:.1f}" if k in by_k and not by_k[k].get("partial") else "-"
                            for k in (1, 5))
            print(f"| {m} | {bb} | " + " | ".join(cells) + f" | **{cm}** | {params[bb] / 1e6:.1f} M |")
        for (m, bb), by_k in sorted(table.items()):
            for k, r in sorted(by_k.items()):
                if r.get("partial"):
                    print(f"\n(partial: {m} {bb} {k}-shot finished {r['partial']}; only the datasets with all "
                          f"their episodes done have cells; no mean)")
    n = {k: len(json.loads(v)["episodes"]) for k, v in episodes0.items()}
    print(f"\nepisodes: {n}")


if __name__ == "__main__":
    main(sys.argv[1:])
