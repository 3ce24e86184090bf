"""Command line: thin wrappers that parse arguments and call the library."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import FdsegError
from .presets import PRESETS
from .segmenter import COLOUR_TAU


def _add_model_args(p: argparse.ArgumentParser, methods_multi: bool = False) -> None:
    g = p.add_argument_group("model")
    if methods_multi:
        g.add_argument("--method", nargs="+", default=["fm"], help="matching methods (default: fm)")
    else:
        g.add_argument("--method", default="fm", help="matching method (default: fm; see `fdseg list`)")
    g.add_argument("--backbone", default="efficientnet_lite0", help="feature backbone (default: efficientnet_lite0)")
    g.add_argument("--weights", default=None, help="backbone weights file (default: the backbone's own)")
    g.add_argument("--backbone-option", action="append", default=[], metavar="KEY=VALUE",
                   help="backbone setting, repeatable (JSON values), e.g. layers=[6,9] norm=false for the DINOv2 "
                        "backbones")
    g.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="named settings (default accurate): accurate = every accuracy rule; fast = one view of each "
                        "image, no zoom; paper = the paper's rule; line = accurate behind a fast first pass that "
                        "answers the queries it proves OK (docs/cascade.md). The flags marked (preset) override it")
    g.add_argument("--size", type=int, default=256, help="network input size / tile size (default: 256)")
    g.add_argument("--resize", default=None, choices=["resize", "aspect", "tile", "auto"],
                   help="(preset) auto (default): strips (aspect >= 4:1, e.g. line-scan) are seen aspect-kept with their short "
                        "side at size (long side at most 16 x size), other images with a long side >= 2 x size aspect-kept at "
                        "2 x size, both with a 2 x coarser cell, the rest as resize; resize: squeeze to size x size (the paper); aspect: keep aspect, long side = size; "
                        "tile: native resolution x --tile-scale in size x size tiles")
    g.add_argument("--zoom", default=None, choices=["auto", "1", "2"],
                   help="(preset) auto (default): with --resize auto, images with a long side >= 4 x size are seen at 4 x size "
                        "(twice the grid) when the supports' defects are under 2 grid cells across (strips never zoom); 1: never; 2: always")
    g.add_argument("--tile-scale", type=float, default=1.0, help="image scale in tile mode (default 1 = native)")
    g.add_argument("--feature-stride", type=int, default=4, help="feature grid cell in input pixels (default 4)")
    g.add_argument("--local-avg", type=int, default=1, help="k x k local feature averaging (default 1 = off)")
    g.add_argument("--support-augment", default=None, choices=["auto", "none", "flip", "dihedral"],
                   help="(preset) auto (default): dihedral for a single support, flip for more; flip: each support also "
                        "flipped left-right and up-down (3x the bank); dihedral: all 8 rotated/flipped views; "
                        "none: the paper's bank")
    g.add_argument("--query-augment", default=None, choices=["auto", "none", "flip"],
                   help="(preset) auto (default): flip with a single support, none with more; flip: each query is also "
                        "matched flipped left-right and up-down and the three margins averaged (3x the matching); "
                        "none: the query as it is")
    g.add_argument("--threshold", type=float, default=None, help="(preset) margin threshold (default 0 = argmax)")
    g.add_argument("--ok-gate", default="auto", choices=["auto", "median", "off"],
                   help="with defect-free images (--normal), every fifth (at most 10) is held out and predicted at "
                        "fit time to calibrate the gate. auto (default, from 25 normals): a mask region no stronger than "
                        "the lower quartile of their defect scores is removed (between half of it and it: cut to its "
                        "core); median (from 5): a query "
                        "whose defect score is not above their median is judged OK, its mask empty (fewer false "
                        "alarms, some missed defects); off: no gate (docs/normals.md)")
    g.add_argument("--colour-refine", type=float, default=None, metavar="TAU",
                   help=f"(preset) support colour rule (default {COLOUR_TAU}): a predicted pixel stays defect only where its "
                        "colour is at least TAU times as likely among the supports' defect pixels as in the "
                        "background around them; 0 = off")
    g.add_argument("--colour-option", action="append", default=[], metavar="KEY=VALUE",
                   help="colour rule setting, repeatable: slack=0.04 (matching threshold lowered with a single "
                        "support while the rule is in effect), min_trimmed=0.5 (the slack only if the rule removes this share of the "
                        "background ring around the support's defect), min_kept=0.5 (the rule is used only if it keeps this share of "
                        "the supports' own defect pixels), tune_from=3 (from this many supports on TAU is chosen on the "
                        "supports; 0 = never), grey=contrast|rgb|off (grey images), contrast=8, window=63, bins=8, ring=8")
    g.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    g.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="numeric path of the backbone and the matching (default: $FDSEG_PRECISION, else auto = bf16 "
                        "where the CPU / GPU runs it fast, fp32 elsewhere); the two paths' masks differ slightly "
                        "(docs/precision.md)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--batch-size", type=int, default=4, help="queries per backbone batch (default 4)")
    g.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="method setting, repeatable; fm: precision=auto|fp32|bf16 (the matching only; default --precision), bg_coreset=0.25 "
                        "(fraction or count of background cells kept), fg_min=0, normal_cells=4096 (defect-free cells kept, "
                        "with --normal), normal_head=sample|bank|off (what of the normals the linear head sees), "
                        "normal_bank=false|true (also put the normals' cells in the matching bank: docs/normals.md), "
                        "normal_head_cells=65536 (normal cells the head sees without the bank)")
    r = p.add_argument_group("refinement and segment-anything (fastsam / sam2 need fdseg[sam])")
    r.add_argument("--refine", default=None, metavar="NAME",
                   help="refine each mask with a region proposer: superpixel (offline), fastsam, sam2_auto")
    r.add_argument("--refine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="proposer or fusion setting, repeatable (e.g. scale=200, min_overlap=0.2, dilation=21)")
    r.add_argument("--fastsam-checkpoint", default=None, help="FastSAM-s.pt / FastSAM-x.pt (for --refine fastsam)")
    r.add_argument("--sam2-checkpoint", default=None,
                   help="SAM2 checkpoint (.pt) for --method sam2_track / fm_prompt and --refine sam2_auto")
    r.add_argument("--sam2-config", default=None,
                   help="SAM2 model config: a YAML file or a config name shipped with sam2 "
                        "(e.g. configs/sam2.1/sam2.1_hiera_t.yaml)")


def _option_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _method_options(items: list[str], flag: str = "--method-option") -> dict:
    from .errors import InputError
    out = {}
    for it in items:
        if "=" not in it:
            raise InputError(flag, f"expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = _option_value(v.strip())
    return out


def _segmenter_kwargs(a: argparse.Namespace) -> dict:
    kw = dict(backbone=a.backbone, weights=a.weights, input_size=a.size, tile_scale=a.tile_scale,
              feature_stride=a.feature_stride, local_avg=a.local_avg, device=a.device)
    if getattr(a, "ok_gate", None):
        kw["ok_gate"] = a.ok_gate
    if getattr(a, "precision", None):
        kw["precision"] = a.precision
    # the preset's settings, with the flags given on top (only those given: the rest is the preset's)
    given = dict(resize=a.resize, threshold=a.threshold, colour_refine=a.colour_refine,
                 zoom=a.zoom if a.zoom in (None, "auto") else int(a.zoom),
                 support_augment=a.support_augment, query_augment=a.query_augment)
    if a.preset:
        kw["preset"] = a.preset
    kw.update({k: v for k, v in given.items() if v is not None})
    if a.colour_option:
        kw["colour_options"] = _method_options(a.colour_option, "--colour-option")
    if a.method_option:
        kw["method_options"] = _method_options(a.method_option)
    if getattr(a, "backbone_option", None):
        kw["backbone_options"] = _method_options(a.backbone_option, "--backbone-option")
    if a.refine and a.refine != "none":
        ro = _method_options(a.refine_option)
        if a.refine == "fastsam" and a.fastsam_checkpoint:
            ro.setdefault("checkpoint", a.fastsam_checkpoint)
        if a.refine == "sam2_auto":
            ro.update({k: v for k, v in _sam2_files(a).items() if k not in ro})
        kw.update(refine=a.refine, refine_options=ro)
    return kw


SAM2_METHODS = ("sam2_track", "fm_prompt")


def _sam2_files(a: argparse.Namespace) -> dict:
    return {k: v for k, v in (("checkpoint", a.sam2_checkpoint), ("config", a.sam2_config)) if v}


def _with_sam2(kw: dict, method: str, a: argparse.Namespace) -> dict:
    """``kw`` with --sam2-checkpoint / --sam2-config added to a SAM2 method's options."""
    if method not in SAM2_METHODS or not _sam2_files(a):
        return kw
    return {**kw, "method_options": {**_sam2_files(a), **kw.get("method_options", {})}}


def _threads(a: argparse.Namespace) -> None:
    if getattr(a, "threads", None):
        import torch
        torch.set_num_threads(a.threads)


def _explain(a: argparse.Namespace, seg) -> None:
    """--explain: what the fit resolved, step by step, with the reasons (stderr keeps stdout for results)."""
    if getattr(a, "explain", False) and len(getattr(seg, "types", ())) > 1:
        print(f"plans ({seg.settings['preset']} preset, {len(seg.types)} defect types, {seg.n_supports} supports):",
              file=sys.stderr)
        print(seg.explain(), file=sys.stderr)
    elif getattr(a, "explain", False):
        print(f"plan ({seg.settings['preset']} preset, {seg.n_supports} support{'s' * (seg.n_supports > 1)}):",
              file=sys.stderr)
        for line in str(seg.plan).splitlines():
            print(f"  {line}", file=sys.stderr)


def _normals(a: argparse.Namespace) -> list[Path] | None:
    """--normal: defect-free image files and folders -> their paths (None when not given)."""
    if not getattr(a, "normal", None):
        return None
    from .normals import collect_normals
    return collect_normals(a.normal)


def _typed_supports(a: argparse.Namespace) -> list[tuple[Path, Path, str]]:
    """--support-dir DIR: DIR/TYPE/images + DIR/TYPE/masks -> (image, mask, type) triples."""
    from .multitype import read_support_dir
    return [(i, m, t) for i, m, t in zip(*read_support_dir(a.support_dir))]


def _fit_segmenter(a: argparse.Namespace, supports: list[tuple], **kw):
    """A segmenter fitted on --support pairs, or a multi-type one on --support-dir's typed supports."""
    from .segmenter import FewShotSegmenter
    images, masks = [s[0] for s in supports], [s[1] for s in supports]
    if getattr(a, "support_dir", None):
        from .multitype import MultiTypeSegmenter
        return MultiTypeSegmenter(method=a.method, **kw).fit(images, masks, types=[s[2] for s in supports],
                                                             normals=_normals(a))
    return FewShotSegmenter(method=a.method, **kw).fit(images, masks, normals=_normals(a))


def cmd_segment(a: argparse.Namespace) -> int:
    from .segment_folder import collect_queries, segment_folder
    _threads(a)
    _check_inspector_args(a)
    supports = _typed_supports(a) if a.support_dir else [(Path(i), Path(m)) for i, m in a.support or []]
    if a.engine == "ray":
        res = _segment_ray(a, supports)
    else:
        if a.inspector:
            seg = _load_inspector(a, a.device)
        else:
            seg = _fit_segmenter(a, supports, batch_size=a.batch_size, **_with_sam2(_segmenter_kwargs(a), a.method, a))
        _explain(a, seg)
        queries = collect_queries(a.query)
        res = segment_folder(seg, queries, a.out, progress=not a.no_progress, resume=a.resume, supports=supports)
    n_def = sum(1 for r in res.rows if r["status"] == "ok" and r["defect_fraction"] > 0)
    n_bad = sum(1 for r in res.rows if r["status"] == "ok" and r.get("verdict") == "defective")
    print(f"{len(res.rows) - len(res.errors)} queries segmented ({n_def} with defect pixels, {n_bad} judged defective), "
          f"{len(res.errors)} skipped -> {a.out.rstrip('/')}/report.html")
    for r in res.errors:
        print(f"  skipped {r['file']}: {r['error']}", file=sys.stderr)
    return 0 if not res.errors else 3


# -- segment --engine ray (fdseg/segment_ray.py; needs the `ray` extra) ----------------------------
def _add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out (--engine ray, needs fdseg[ray])")
    g.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process; ray: a pool of Ray actors (Ray Data)")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to use (auto, ray://HEAD:10001, ...; default: RAY_ADDRESS or a local Ray)")
    g.add_argument("--actors", type=int, default=None, help="actor pool size (default: cluster CPUs / --cpus-per-actor)")
    g.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor (default 1)")
    g.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per actor; > 0 runs the actors on CUDA (default: 1 with --device cuda, else 0)")
    g.add_argument("--ray-batch-size", type=int, default=8, help="images per actor call (default 8)")


def _segment_ray(a: argparse.Namespace, supports: list[tuple]):
    from .segment_ray import import_ray, list_queries, segment_ray
    import_ray()                                   # a missing extra fails before any work
    gpus = a.gpus_per_actor if a.gpus_per_actor is not None else (1.0 if a.device.startswith("cuda") else 0.0)
    # fitted (or loaded) on the driver's CPU and shipped; the actors move it to their own device
    if a.inspector:
        seg = _load_inspector(a, "cpu")
    else:
        seg = _fit_segmenter(a, supports, **{**_segmenter_kwargs(a), "device": "cpu"})
    _explain(a, seg)
    return segment_ray(seg, list_queries(a.query), a.out, actors=a.actors, cpus_per_actor=a.cpus_per_actor,
                       inspector=Path(a.inspector).read_bytes() if a.inspector else None,
                       gpus_per_actor=gpus, batch_size=a.ray_batch_size, resume=a.resume,
                       progress=not a.no_progress, supports=supports, address=a.ray_address)


# -- inspector files: fit once, save, segment with the file (fdseg/inspector.py) -------------------------
# the model options an inspector file fixes (segment --inspector refuses them); --device, --precision,
# --threads, --batch-size and --weights (where the weights file lives here) stay the user's
_FIXED_BY_INSPECTOR = ("method", "backbone", "preset", "size", "resize", "zoom", "tile_scale", "feature_stride",
                       "local_avg", "support_augment", "query_augment", "threshold", "ok_gate", "colour_refine",
                       "colour_option", "method_option", "refine", "refine_option", "fastsam_checkpoint",
                       "sam2_checkpoint", "sam2_config", "normal")


def _check_inspector_args(a: argparse.Namespace) -> None:
    """segment: --inspector FILE or --support IMAGE MASK (one of them), and no option the file fixes."""
    from .errors import InputError
    if a.inspector and (a.support or getattr(a, "support_dir", None)):
        raise InputError("--inspector", "give either --inspector FILE or --support IMAGE MASK / --support-dir DIR, "
                                        "not both (the file holds its fitted supports)")
    if a.support and getattr(a, "support_dir", None):
        raise InputError("--support-dir", "give either --support IMAGE MASK (one defect type) or --support-dir DIR "
                                          "(DIR/TYPE/images + masks: several types), not both")
    if not a.inspector and not a.support and not getattr(a, "support_dir", None):
        raise InputError("--support", "need --support IMAGE MASK (repeat for K-shot), --support-dir DIR or "
                                      "--inspector FILE")
    if a.inspector:
        defaults = build_parser().parse_args(["segment", "--inspector", "x", "--query", "x", "--out", "x"])
        given = [k for k in _FIXED_BY_INSPECTOR if getattr(a, k, None) != getattr(defaults, k, None)]
        if given:
            raise InputError("--inspector", f"the inspector file fixes the model: drop "
                                            f"{', '.join('--' + k.replace('_', '-') for k in given)}")


def _load_inspector(a: argparse.Namespace, device: str):
    """Load --inspector FILE; a numeric-path warning becomes one stderr line."""
    import warnings
    from .inspector import load
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = load(a.inspector, device=device, precision=a.precision, weights=a.weights,
                   batch_size=a.batch_size)
    for w in caught:
        print(f"fdseg: warning: {w.message}", file=sys.stderr)
    return seg


def cmd_fit(a: argparse.Namespace) -> int:
    from .segmenter import FewShotSegmenter
    _threads(a)
    supports = [(Path(i), Path(m)) for i, m in a.support]
    seg = FewShotSegmenter(method=a.method, batch_size=a.batch_size, **_with_sam2(_segmenter_kwargs(a), a.method, a))
    seg.fit([s[0] for s in supports], [s[1] for s in supports], normals=_normals(a))
    print(f"plan ({seg.settings['preset']} preset, {seg.n_supports} support{'s' * (seg.n_supports > 1)}):")
    for line in str(seg.plan).splitlines():
        print(f"  {line}")
    out = seg.save(a.out, include_supports=a.include_supports, supports=supports if a.include_supports else None)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB{', with the support images' if a.include_supports else ''}); "
          f"use it with: fdseg segment --inspector {out} --query ... --out ...")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspector import describe, describe_text
    info = describe(a.file)
    print(json.dumps(info, indent=1, default=lambda v: list(v) if isinstance(v, tuple) else str(v)) if a.json
          else describe_text(info))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import BenchConfig, markdown_table, run_bench
    _threads(a)
    cfg = BenchConfig(data=Path(a.data), out=Path(a.out), methods=a.method, shots=a.shots, seed=a.seed,
                      eval_size=a.eval_size, datasets=a.datasets, classes=a.classes,
                      max_per_class=a.max_per_class, episodes_file=Path(a.episodes) if a.episodes else None,
                      gallery=a.gallery, segmenter=_segmenter_kwargs(a), progress=not a.no_progress,
                      cache_size=0 if a.no_cache else 192,
                      normals=Path(a.normal) if a.normal else None,
                      normal_count=None if a.normal_count == 0 else a.normal_count,
                      ok_queries=Path(a.ok_queries) if a.ok_queries else None, ok_count=a.ok_count,
                      per_method={m: _with_sam2({}, m, a)["method_options"] for m in a.method
                                  if _with_sam2({}, m, a)})
    if a.multi_type:
        return _bench_multi_type(a, cfg)
    res = run_bench(cfg)
    print(markdown_table(res))
    print(f"-> {Path(a.out) / 'report.html'}")
    return 0


def _bench_multi_type(a: argparse.Namespace, cfg) -> int:
    """bench --multi-type: every class of a dataset is a defect type (fdseg/multitype_bench.py)."""
    from .errors import InputError
    from .multitype_bench import run_multi_type_bench
    unsupported = [f for f, v in (("--episodes", a.episodes), ("--normal", a.normal), ("--ok-queries", a.ok_queries))
                   if v]
    if unsupported or len(a.method) > 1:
        raise InputError("--multi-type", f"runs one method on its own episodes: drop "
                                         f"{', '.join(unsupported) or '--method ' + ' '.join(a.method[1:])}")
    res = run_multi_type_bench(cfg, method=a.method[0])
    from .multitype_bench import markdown
    print(markdown(res))
    print(f"-> {Path(a.out) / 'multi_type' / 'results.md'}")
    return 0


def cmd_train_meta(a: argparse.Namespace) -> int:
    from .train_meta import FeatureSpec, TrainConfig, evaluate, lodo, train
    from .bench import markdown_table
    from .errors import InputError
    _threads(a)
    spec = FeatureSpec(backbone=a.backbone, weights=a.weights, input_size=a.size, feature_stride=a.feature_stride)
    cfg = TrainConfig(data=Path(a.data), out=Path(a.out), train_datasets=a.train_datasets or [],
                      test_datasets=a.test_datasets or [], skip_first_per_class=a.skip_first_per_class,
                      features=spec, cache=Path(a.cache) if a.cache else None, steps=a.steps, batch=a.batch,
                      shots=a.train_shots, lr=a.lr, align_weight=a.align_weight, dim=a.dim, hidden=a.hidden,
                      pool=a.pool,                       seed=a.seed, save_every=a.save_every, max_minutes=a.max_minutes, progress=not a.no_progress)
    if a.lodo:
        if a.train_datasets:
            raise InputError("--lodo", "trains on every dataset but the held-out one: drop --train-datasets")
        for ds, res in lodo(cfg, Path(a.out), a.shots, a.max_per_class, a.test_datasets or None).items():
            print(f"## meta, {ds} held out\n" + markdown_table(res))
        return 0
    ck = train(cfg)
    c = ck["curve"]
    print(f"trained {ck['step']}/{cfg.steps} steps in {ck['seconds'] / 60:.1f} min "
          f"({ck.get('cpu_seconds', 0) / 60:.1f} CPU min); loss "
          f"{c[0][1]:.3f} (first 10 steps) -> {c[-1][1]:.3f} (last) -> {cfg.checkpoint}")
    if cfg.test_datasets and ck["step"] >= cfg.steps:
        res = evaluate(cfg.checkpoint, cfg.data, Path(a.out) / "eval", cfg.test_datasets, a.shots,
                       a.max_per_class, cfg.progress)
        print(markdown_table(res))
    print(f"use it with: --method meta --method-option checkpoint={cfg.checkpoint}")
    return 0


def cmd_datasets(a: argparse.Namespace) -> int:
    from .data.layouts import scan, validate
    cat = scan(a.root, a.layout)
    validate(cat, deep=a.deep, progress=not a.no_progress and a.deep)
    rows = cat.counts()
    if a.json:
        print(json.dumps({"root": str(cat.root), "layout": cat.layout,
                          "classes": [{"dataset": d, "class": c, "images": n} for d, c, n in rows],
                          "problems": [str(p) for p in cat.problems]}, indent=1))
    else:
        print(f"{cat.root} ({cat.layout} layout)")
        w = max([len(f"{d}/{c}") for d, c, _ in rows] + [10])
        for d, c, n in rows:
            print(f"  {d + '/' + c:<{w}}  {n:5d}")
        total = sum(n for d, c, n in rows if not c.startswith("("))
        print(f"  {len(cat.datasets)} datasets, {sum(1 for _, c, _ in rows if not c.startswith('('))} classes, "
              f"{total} defect images")
        if cat.problems:
            print(f"{len(cat.problems)} problems:")
            for p in cat.problems:
                print(f"  {p}")
        else:
            print("no problems found" + ("" if a.deep else " (headers checked; --deep decodes every file)"))
    return 1 if cat.problems else 0


def cmd_export(a: argparse.Namespace) -> int:
    from .errors import InputError
    if a.inspector:
        # a fitted inspector -> one graph: image in, margin grid / mask out (docs/onnx-inspector.md)
        if a.backbone is not None:
            raise InputError("--backbone", "the inspector file fixes the backbone; give --inspector or --backbone")
        from .export_inspector import export_inspector
        out = export_inspector(a.inspector, a.out, prune=not a.exact_margins, opset=a.opset, weights=a.weights)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): image (uint8 1x3xHxW RGB) -> margin, margin_map, "
              f"mask, defect_score; run it with onnxruntime (docs/onnx-inspector.md)")
        return 0
    if a.exact_margins:
        raise InputError("--exact-margins", "applies to --inspector only")
    from .export import export_onnx
    backbone = a.backbone or "efficientnet_lite0"
    out = export_onnx(backbone, a.out, weights=a.weights, opset=a.opset)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); use it with --backbone onnx --weights {out}")
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill
    _threads(a)
    cfg = DistillConfig(data=a.data, out=a.out, teacher=a.teacher, teacher_weights=a.teacher_weights,
                        arch=a.arch, minutes=a.minutes, max_steps=a.max_steps, seed=a.seed, size=a.size,
                        crop=a.crop, batch=a.batch, crops_per_image=a.crops_per_image,
                        stats_images=a.stats_images, lr=a.lr, gray_p=a.gray_p, flip=not a.no_flip,
                        max_images=a.max_images,
                        checkpoint_s=a.checkpoint_every, progress=not a.no_progress)
    r = distill(cfg, resume=a.resume)
    print(f"fdseg distill: {r.steps} steps in {r.seconds / 60:.1f} min on {r.images} images; probe loss "
          f"{r.probe_loss_start:.4f} -> {r.probe_loss_end:.4f}; student {r.student_file} "
          f"({r.student_bytes / 1e6:.1f} MB): use it with --backbone {cfg.arch} --weights {r.student_file}")
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    from .backbones.registry import BACKBONES
    from .methods.registry import METHODS
    from .refine.proposers import PROPOSERS
    for title, reg in (("backbones", BACKBONES), ("methods", METHODS), ("refinements (--refine)", PROPOSERS)):
        print(f"{title}:")
        for n in reg.names():
            e = reg.entry(n)
            extra = f"  [needs fdseg[{e.extra}]]" if e.extra else ""
            print(f"  {n:22s} {e.summary}{extra}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .errors import InputError
    from .serve import ServeConfig, Settings, serve
    from .serve.auth import new_token, read_token_file
    _threads(a)
    weights = {}
    for w in a.weights or []:
        name, sep, path = w.partition("=")
        if not sep or not name or not path:
            raise InputError("--weights", f"expected BACKBONE=PATH, got {w!r}")
        if not Path(path).is_file():
            raise InputError(path, "weights file does not exist")
        weights[name] = path
    loopback = a.host in ("127.0.0.1", "localhost", "::1")
    # the access token: from --token-file (anywhere), else a new one on a network address unless --no-auth
    token = read_token_file(a.token_file) if a.token_file else None
    generated = token is None and not loopback and not a.no_auth
    if generated:
        token = new_token()
    cfg = ServeConfig(max_request_bytes=int(a.max_request_mb * 2**20), max_file_bytes=int(a.max_file_mb * 2**20),
                      max_pixels=a.max_pixels, max_supports=a.max_supports, max_queries=a.max_queries,
                      max_sessions=a.max_sessions, workers=a.workers, max_queue=a.max_queue, device=a.device,
                      weights=weights, sessions_dir=None if a.sessions_dir == "" else Path(a.sessions_dir),
                      defaults=Settings(method=a.method, backbone=a.backbone, threshold=a.threshold, size=a.size,
                                        resize=a.resize, preset=a.preset), token=token)
    say = lambda msg: print(f"fdseg serve: {msg}", file=sys.stderr)  # noqa: E731
    if a.inspector:     # loaded before the server starts: a bad file stops here with one line (exit 2)
        from .serve import _need_extra
        from .serve.engine import open_inspector
        _need_extra()
        for f in a.inspector:
            s = open_inspector(Path(f), cfg, pinned=True)
            cfg.inspectors.append(s)
            i = s.inspector
            say(f"inspector {i['file']} ready ({i['preset']} preset, {i['supports']} support"
                f"{'s' * (i['supports'] != 1)}, fitted on {i['precision']}): session {s.id}")
            if s.precision_note:
                say(f"warning: {i['file']}: {s.precision_note}")
    hosts = None if loopback else (a.allowed_host or ["*"])
    shown = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{a.port}/"
    elsewhere = (" (from other machines: this machine's name or address instead of 127.0.0.1)"
                 if a.host in ("0.0.0.0", "::") else "")
    if generated:       # the one place the token is shown: this terminal, once
        say(f"listening on {a.host}: every request needs this access token (a new one at each start; "
            f"--token-file FILE keeps one; REST: header 'Authorization: Bearer TOKEN')")
        say(f"open {url}#token={token}{elsewhere}")
    elif token is not None:
        if len(token) < 16:
            say(f"warning: the token in {a.token_file} has only {len(token)} characters; a long random one is "
                f"far harder to guess: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        say(f"listening on {a.host}: every request needs the access token in {a.token_file} "
            f"(REST: header 'Authorization: Bearer TOKEN'; the page asks for it, or open {url}#token=TOKEN)")
        say(f"open {url}{elsewhere}")
    else:
        if not loopback:
            say(f"listening on {a.host} with --no-auth: anyone who can reach this machine can use the app "
                f"(there is no login)")
        say(f"open {url}{elsewhere}")
    say("API spec: /openapi.json; Ctrl-C stops")
    serve(cfg, host=a.host, port=a.port, allowed_hosts=hosts, log_level=a.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="fdseg", description="Few-shot industrial defect segmentation.")
    p.add_argument("--version", action="version", version=f"fdseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment query images from 1..K support images with masks")
    s.add_argument("--support", nargs=2, action="append", default=None, metavar=("IMAGE", "MASK"),
                   help="a support image and its defect mask (repeat for K-shot); or --inspector")
    s.add_argument("--support-dir", default=None, metavar="DIR",
                   help="several defect types: DIR/TYPE/images + DIR/TYPE/masks (one folder per type, the dataset "
                        "layout); writes labels/STEM.png (value k = type k) with labels/legend.json and a types "
                        "column")
    s.add_argument("--inspector", default=None, metavar="FILE",
                   help="a fitted inspector file (fdseg fit ... --out FILE) instead of --support: its settings, "
                        "plan and fitted state (--device, --precision, --threads, --batch-size, --weights still apply)")
    s.add_argument("--query", nargs="+", required=True, help="query image files, folders or globs")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--resume", action="store_true", help="skip queries already finished in OUT")
    s.add_argument("--normal", nargs="+", default=None, metavar="DIR_OR_FILE",
                   help="defect-free (OK) images of the same product, files or folders: their cells join the "
                        "matcher's background, which lowers false alarms (fm)")
    s.add_argument("--explain", action="store_true",
                   help="print the fitted plan: what each step decided on the supports, and why")
    s.add_argument("--no-progress", action="store_true")
    _add_model_args(s)
    _add_ray_args(s)
    s.set_defaults(func=cmd_segment)

    f = sub.add_parser("fit", help="fit on support images once and save an inspector file (segment --inspector)")
    f.add_argument("--support", nargs=2, action="append", required=True, metavar=("IMAGE", "MASK"),
                   help="a support image and its defect mask (repeat for K-shot)")
    f.add_argument("--normal", nargs="+", default=None, metavar="DIR_OR_FILE",
                   help="defect-free (OK) images of the same product, files or folders (fm; the OK gate from 25)")
    f.add_argument("--out", required=True, help="the inspector file to write (e.g. line3.fdseg)")
    f.add_argument("--include-supports", action="store_true",
                   help="also store the support images and masks (PNG) in the file, so that a later fdseg can refit")
    _add_model_args(f)
    f.set_defaults(func=cmd_fit)

    i = sub.add_parser("inspect", help="print what an inspector file holds (and check it)")
    i.add_argument("file", help="an inspector file (fdseg fit --out FILE)")
    i.add_argument("--json", action="store_true", help="as JSON")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="evaluate methods with the paper's episode protocol")
    b.add_argument("--data", required=True, help="dataset root (fdseg, GFDS, MVTec AD or VisA layout)")
    b.add_argument("--out", default="bench-out", help="output folder (default bench-out); rerun to resume")
    b.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    b.add_argument("--seed", type=int, default=2, help="episode seed (paper: 2)")
    b.add_argument("--eval-size", type=int, default=256, help="evaluation resolution (paper 256; 0 = native)")
    b.add_argument("--datasets", nargs="+", default=None, help="only these datasets")
    b.add_argument("--classes", nargs="+", default=None, help="only these classes (CLASS or DATASET/CLASS)")
    b.add_argument("--max-per-class", type=int, default=None, help="first N images of each class only")
    b.add_argument("--multi-type", action="store_true",
                   help="every class of a dataset is a defect type: one episode = K supports of every class, the "
                        "query labelled among them; per-type IoU, type confusion matrices and image-level type "
                        "accuracy beside one type per fit on the same queries (OUT/multi_type/). --classes takes "
                        "globs (visa/macaroni1_*)")
    b.add_argument("--episodes", default=None, help="episode JSON from an earlier run (identical episodes)")
    b.add_argument("--gallery", type=int, default=3, help="gallery panels per dataset and run (default 3)")
    b.add_argument("--normal", default=None, metavar="DIR",
                   help="defect-free images per class passed to each fit (DIR/index.csv with file,source columns, "
                        "DIR/DATASET/CLASS/*.png or DIR/DATASET/*.png; see docs/normals.md)")
    b.add_argument("--normal-count", type=int, default=50, help="normals per class, evenly spread (default 50; 0 = all)")
    b.add_argument("--ok-queries", default=None, metavar="DIR",
                   help="defect-free images per class (same layouts as --normal) added as OK queries: image-level "
                        "AUROC and false alarms; never among the normals")
    b.add_argument("--ok-count", type=int, default=5, help="OK queries per class (default 5)")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--no-cache", action="store_true",
                   help="recompute every support's features in every episode (the paper's loop; for timing)")
    _add_model_args(b, methods_multi=True)
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("train-meta", help="train the meta-learning baseline (method 'meta') episodically")
    t.add_argument("--data", required=True, help="dataset root")
    t.add_argument("--out", required=True, help="output folder: OUT/meta.pt (rerun to resume)")
    t.add_argument("--train-datasets", nargs="+", default=None, help="datasets to train on")
    t.add_argument("--test-datasets", nargs="+", default=None, help="evaluate on these after training (bench)")
    t.add_argument("--lodo", action="store_true",
                   help="leave-one-dataset-out: each dataset (or each of --test-datasets) in turn held out, "
                        "trained on all the others -> OUT/DATASET/meta.pt and OUT/DATASET/eval/")
    t.add_argument("--skip-first-per-class", type=int, default=0,
                   help="never train on the first N images of each class (in-domain training; evaluate "
                        "with --max-per-class N)")
    t.add_argument("--steps", type=int, default=600, help="optimiser steps (default 600)")
    t.add_argument("--batch", type=int, default=4, help="episodes per step (default 4)")
    t.add_argument("--train-shots", type=int, default=1, help="supports per training episode (default 1)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--align-weight", type=float, default=1.0, help="prototype-alignment loss weight (0 = off)")
    t.add_argument("--dim", type=int, default=64, help="projected feature channels (default 64)")
    t.add_argument("--hidden", type=int, default=32, help="head channels (default 32)")
    t.add_argument("--pool", type=int, default=2, help="average-pool the feature grid (default 2: 32 x 32 cells)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this training time")
    t.add_argument("--cache", default=None, help="feature cache folder (default: beside OUT)")
    t.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="evaluation shots (default 1 5)")
    t.add_argument("--max-per-class", type=int, default=None, help="evaluate on the first N images per class")
    t.add_argument("--backbone", default="efficientnet_lite0", help="frozen backbone (default efficientnet_lite0)")
    t.add_argument("--weights", default=None, help="backbone weights file")
    t.add_argument("--size", type=int, default=256, help="network input size (images squeezed to size x size)")
    t.add_argument("--feature-stride", type=int, default=4)
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train_meta)

    d = sub.add_parser("datasets", help="list and validate the datasets under a root folder")
    d.add_argument("root")
    d.add_argument("--layout", default="auto", choices=["auto", "fdseg", "gfds", "mvtec", "visa"])
    d.add_argument("--deep", action="store_true", help="decode every image and mask")
    d.add_argument("--json", action="store_true")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_datasets)

    e = sub.add_parser("export", help="export a backbone to ONNX (run it with --backbone onnx --weights F), or a "
                                      "fitted inspector file to one ONNX graph (--inspector)")
    e.add_argument("--backbone", default=None, help="backbone to export (default efficientnet_lite0)")
    e.add_argument("--inspector", default=None, metavar="FILE",
                   help="a fitted inspector (.fdseg): export its whole predict as one graph, image in -> margin "
                        "grid, margin map, mask, defect score out (docs/onnx-inspector.md)")
    e.add_argument("--exact-margins", action="store_true",
                   help="with --inspector: match every grid cell exactly (slower); by default only the cells the "
                        "mask and the defect score depend on are, the others keep upper bounds (as predict does)")
    e.add_argument("--weights", default=None, help="backbone weights (default: the backbone's own); with "
                                                   "--inspector: where its weights file is on this machine")
    e.add_argument("--format", default="onnx", choices=["onnx"])
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--out", required=True, help="output .onnx file")
    e.set_defaults(func=cmd_export)
    v = sub.add_parser("serve", help="local web app + REST API (needs fdseg[serve])")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8765)
    v.add_argument("--allowed-host", action="append", default=None,
                   help="Host header names accepted when binding a non-loopback address (default: any)")
    auth = v.add_mutually_exclusive_group()
    auth.add_argument("--token-file", default=None, metavar="PATH",
                      help="file holding the access token on one line: every request needs it (header "
                           "'Authorization: Bearer TOKEN'), on any address. Default on a non-loopback --host: "
                           "a new random token, printed once at start")
    auth.add_argument("--no-auth", action="store_true",
                      help="no access token on a non-loopback --host: anyone who can reach the machine can use it")
    v.add_argument("--inspector", action="append", default=None, metavar="FILE",
                   help="an inspector file (fdseg fit ... --out FILE) to offer as a ready session: the page opens "
                        "it with no supports needed (repeatable; a bad file stops the start with one line)")
    v.add_argument("--sessions-dir", default=str(Path.home() / ".fdseg" / "sessions"),
                   help="where 'save session' writes (default ~/.fdseg/sessions; '' turns saving off)")
    v.add_argument("--method", default="fm", help="default method shown in the app (default fm)")
    v.add_argument("--backbone", default="efficientnet_lite0", help="default backbone")
    v.add_argument("--weights", action="append", metavar="BACKBONE=PATH",
                   help="weights file for a backbone that needs one (repeatable)")
    v.add_argument("--size", type=int, default=256, help="default network input size")
    v.add_argument("--resize", default="", choices=["resize", "aspect", "tile", "auto", ""],
                   help="default resize mode shown in the app ('' = the preset's)")
    v.add_argument("--preset", default="accurate", choices=list(PRESETS), help="default preset shown in the app")
    v.add_argument("--threshold", type=float, default=0.0)
    v.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    v.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    v.add_argument("--workers", type=int, default=1, help="fits/predictions run at once (default 1)")
    v.add_argument("--max-queue", type=int, default=64, help="requests waiting for a worker before 503")
    v.add_argument("--max-request-mb", type=float, default=64, help="largest request body (default 64 MB)")
    v.add_argument("--max-file-mb", type=float, default=32, help="largest uploaded file (default 32 MB)")
    v.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image (default 40 megapixels)")
    v.add_argument("--max-supports", type=int, default=5)
    v.add_argument("--max-queries", type=int, default=32, help="queries per request (default 32)")
    v.add_argument("--max-sessions", type=int, default=16, help="live sessions kept in memory")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    v.set_defaults(func=cmd_serve)

    t = sub.add_parser("distill", help="distill a PDN student from a backbone on a folder of images")
    t.add_argument("--data", required=True, help="folder of training images (searched recursively)")
    t.add_argument("--out", required=True, help="output folder: checkpoint.pt, student.pt, train.json")
    t.add_argument("--teacher", default="efficientnet_lite0", help="teacher backbone (default efficientnet_lite0)")
    t.add_argument("--teacher-weights", default=None, help="teacher weights file (default: its own)")
    t.add_argument("--arch", default="pdn_small", choices=["pdn_tiny", "pdn_small", "pdn_medium"],
                   help="student architecture (default pdn_small; pdn_tiny is the CPU-minded variant)")
    t.add_argument("--minutes", type=float, default=30.0, help="training-time budget, all runs together (default 30)")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps as well")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--size", type=int, default=256, help="images are squeezed to size x size (default 256)")
    t.add_argument("--crop", type=int, default=64, help="student crop size, multiple of 4 (default 64)")
    t.add_argument("--batch", type=int, default=8, help="crops per step (default 8)")
    t.add_argument("--crops-per-image", type=int, default=4,
                   help="crops per teacher pass, divides --batch (default 4: the teacher sees batch/4 images)")
    t.add_argument("--stats-images", type=int, default=256,
                   help="images for the per-channel target mean / std (default 256)")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--gray-p", type=float, default=0.1, help="grayscale augmentation probability (default 0.1)")
    t.add_argument("--no-flip", action="store_true", help="no random flips")
    t.add_argument("--max-images", type=int, default=None, help="first N images of DATA only")
    t.add_argument("--checkpoint-every", type=float, default=120.0, help="seconds between checkpoints (default 120)")
    t.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_distill)

    ls = sub.add_parser("list", help="list registered backbones and methods")
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FdsegError as e:
        print(f"fdseg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fdseg: interrupted; finished results are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
