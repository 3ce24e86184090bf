"""Combine `fdseg bench` outputs of several backbones into one markdown table (BENCHMARKS.md).

    python benchmarks/backbones_table.py bench-bb/efficientnet_lite0-fm bench-bb/efficientnet_lite0-proto ...

Each folder is one `fdseg bench --backbone B --method M --shots 1 5` run. Rows = method x backbone;
columns = datasets, each "1-shot / 5-shot" mIoU (and a second table with FB-IoU); class-mean mIoU;
median wall ms per query (fit + predict); feature-path parameters. The script refuses folders whose
episodes differ from the first one's (the comparison needs identical episodes).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def feature_params(backbone: str) -> int:
    """Parameters on the path from the image to the tapped feature maps (heads excluded)."""
    import torch
    from fdseg import create_backbone
    bb = create_backbone(backbone)
    used: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: used.update(id(p) for p in mod.parameters(recurse=False)))
             for m in bb.modules()]
    with torch.inference_mode():
        bb(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    return sum(p.numel() for p in bb.parameters() if id(p) in used)


def main(dirs: list[str]) -> None:
    runs, episodes0 = [], {}
    for d in map(Path, dirs):
        res = json.loads((d / "results.json").read_text())
        for k in (1, 5):
            ep = (d / f"episodes_{k}shot.json").read_text()
            if episodes0.setdefault(k, ep) != ep:
                sys.exit(f"{d}: its {k}-shot episodes differ from {dirs[0]}'s")
        bb = res["segmenter"]["backbone"]
        for r in res["runs"]:
            runs.append((bb, r))
    backbones = list(dict.fromkeys(bb for bb, _ in runs))
    params = {bb: feature_params(bb) for bb in backbones}
    datasets = sorted({x["dataset"] for _, r in runs for x in r["datasets"]})
    table: dict[tuple[str, str], dict[int, dict]] = {}
    for bb, r in runs:
        table.setdefault((r["method"], bb), {})[r["shots"]] = r
    for metric, title in (("miou", "mIoU"), ("fbiou", "FB-IoU")):
        print(f"\n{title} x 100, 1-shot / 5-shot:\n")
        print("| method | backbone | " + " | ".join(datasets) + " | class-mean mIoU | ms/query (wall) | params |")
        print("|" + "---|" * (len(datasets) + 5))
        for (m, bb), by_k in sorted(table.items()):
            cells = []
            for ds in datasets:
                v = []
                for k in (1, 5):
                    d = {x["dataset"]: x for x in by_k[k]["datasets"]}.get(ds) if k in by_k else None
                    v.append(f"{100 * d[metric]:.1f}" if d else "-")
                cells.append(" / ".join(v))
            cm = " / ".join(f"{100 * by_k[k]['class_mean_miou']:.1f}" if k in by_k else "-" for k in (1, 5))
            ms = " / ".join(f"{by_k[k]['ms_per_query_median']:.0f}" if k in by_k and by_k[k]['ms_per_query_median']
                            else "-" for k in (1, 5))
            print(f"| {m} | {bb} | " + " | ".join(cells) + f" | **{cm}** | {ms} | {params[bb] / 1e6:.1f} M |")
    n = {k: len(json.loads(v)["episodes"]) for k, v in episodes0.items()}
    print(f"\nepisodes: {n}")


if __name__ == "__main__":
    main(sys.argv[1:])
