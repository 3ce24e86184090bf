"""Export a fitted inspector (``.fdseg``) to one ONNX graph: image in -> margin grid and mask out.

    fdseg export --inspector line3.fdseg --out line3.onnx
    # or: fdseg.export_inspector.export_inspector("line3.fdseg", "line3.onnx")

The graph does for one query what ``fdseg.load(path, precision="fp32").predict(image)`` does before
the OK gate's connected components, with onnxruntime alone (docs/onnx-inspector.md):

* input ``image``: uint8, ``1 x 3 x H x W`` (RGB, channels first), at the image's own size (any H, W:
  the axes are dynamic). Give it the pixels fdseg's loader gives (``fdseg.data.images.load_image``:
  grey and palette images as RGB, 16-bit ones scaled to 8 bits); for 8-bit files PIL's
  ``Image.open(f).convert("RGB")`` is the same.
* inside: the resize to the network input exactly as the plan's :class:`~fdseg.data.preprocess.Preprocess`
  decides it for an H x W image (``resize="auto"``: squeezed to ``size`` squared, or aspect-kept at
  2 x ``size`` with a 2x coarser cell from a long side of 2 x ``size`` on, strips, ``zoom=2``; the
  choice is made in the graph from the input's shape, so one graph serves every size class), the
  backbone's normalisation, the backbone (fp32), the layer combination (per-layer L2 norm, bilinear
  resize to the grid, concatenation, L2 norm), the matching against the fitted foreground and
  background banks (constants; cosine maxima by MatMul + ReduceMax over fixed blocks of the bank),
  the linear head's vote, the query's flipped views where the plan has them (``query views=flip``:
  the flips run in the graph as a batch of 3 and their margins are averaged as ``merge_views`` does),
  the bilinear upsampling of the margin grid to H x W, the threshold, the support colour rule
  (RGB histogram-ratio table, or for grey supports the local-contrast table with its box filter)
  and the ``median`` OK gate (a query whose defect score is not above the level gets an empty mask).
* outputs: ``margin`` (gh x gw float32: the margin grid), ``margin_map`` (H x W float32: the
  margin upsampled to the image, what the threshold is applied to), ``mask`` (H x W bool), and
  ``defect_score`` (float64 scalar: the grid's largest margin minus the threshold).
* not in the graph: the default (``auto``) OK gate's removal of weak mask components and the
  image-level verdict (both need connected components, which ONNX has no operator for). The
  model's metadata holds the gate's level and rule; :func:`gate_and_verdict` (numpy + scipy)
  applies them to the graph's outputs as ``finish`` does.

Not exportable (an :class:`~fdseg.errors.InputError` says which and why): a matcher other than
``fm``, fm's ``query_bg`` (the query's own cells as background), a refinement proposer (SAM,
superpixels), ``resize="tile"``, ``antialias=True``, a backbone that torch cannot trace to ONNX.

The graph is the fp32 path; an inspector fitted on the bf16 path keeps its banks (as fitted) and is
exported with its backbone in fp32: compare it with ``fdseg.load(path, precision="fp32")``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FdsegError, InputError

FORMAT = "fdseg-inspector-onnx"
FORMAT_VERSION = 1
META_KEY = "fdseg_inspector"       # the ONNX metadata_props key holding the JSON description
INPUT = "image"
OUTPUTS = ("margin", "margin_map", "mask", "defect_score")
DEFAULT_CHUNK = 2048               # bank rows per MatMul block (its output: query rows x 2048 x 4 bytes)
TOP_K = 32                         # pruned search: the highest bounds matched exactly before the last step

INCLUDES = ("resize to the network input as the plan's Preprocess decides it from the image's shape "
            "(every size class of the plan's resize mode)", "backbone input normalisation", "backbone (fp32)",
            "layer combination: per-layer L2 norm, bilinear resize to the grid, concatenation, L2 norm",
            "cosine maxima against the fitted foreground and background banks (constants)",
            "linear head's vote", "query flip views averaged (when the plan has them)",
            "bilinear upsampling of the margin grid to the image's size", "threshold",
            "support colour rule (when in effect)", "median OK gate (when fitted with ok_gate=median)")
EXCLUDES = ("image decoding and conversion to 8-bit RGB (give the pixels fdseg's load_image gives)",
            "OK gate 'auto': removal of weak mask components (connected components; gate_and_verdict "
            "or the metadata's level and rule)",
            "image-level verdict is_defective (largest 8-connected mask component >= min_cells grid cells)",
            "component boxes, the score map (sigmoid((margin_map - threshold) / temperature))",
            "the max_pixels / minimum-size checks of fdseg's loader")


# ------------------------------------------------------------------------------------------- the module

def _build_module(seg, chunk: int, prune: bool = True):
    """The torch module of ``seg``'s fitted predict for one query (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from .methods.fm import FEATURE_GAIN, HEAD_SCALE, PRUNE_BAND, PRUNE_FIRST, PRUNE_STRIDE
    from .methods.similarity import cover_subset, strided_subset

    st = seg.state
    pre = st.plan.preprocess
    ex = st.extractor
    meth = st.method
    post = st.post
    stride, local_avg = ex.config.stride, ex.config.local_avg
    backbone = ex.backbone
    views = seg.query_views

    fg = meth.fg.float().cpu()
    bg = meth.bg.float().cpu()
    if meth.bg_cover is not None:                 # as fm._search_banks reduces it at the first query
        bg = bg[cover_subset(bg, meth.bg_cover)]
    head_w = meth.head_w.float().cpu() if (meth.head and meth.head_w is not None) else None
    colour = post.colour

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            # the banks as C x rows blocks, registered as buffers: one initializer each in the graph,
            # however many MatMuls read it
            self.fg = self.blocks("fg", fg)
            self.bg = self.blocks("bg", bg)
            self.coarse = [self.blocks(f"bg_every{step}", bg[strided_subset(len(bg), step)])
                           for step in (PRUNE_STRIDE * PRUNE_FIRST, PRUNE_STRIDE)] if prune else []
            if head_w is not None:        # C x 1: a MatMul by a 1-D weight came out wrong in onnxruntime
                self.register_buffer("head_w", head_w[:-1].reshape(-1, 1).clone())
                self.register_buffer("head_b", head_w[-1:].clone())
            self.register_buffer("mean", torch.tensor(backbone.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(backbone.std, dtype=torch.float32).view(1, 3, 1, 1))
            if colour is not None:        # the colour rule's table, as keep / trim per bin
                self.register_buffer("keep", torch.from_numpy(np.asarray(colour.table) >= colour.tau))

        def blocks(self, name, bank):
            names = []
            for j, i in enumerate(range(0, len(bank), chunk)):
                self.register_buffer(f"{name}_{j}", bank[i:i + chunk].T.contiguous())
                names.append(f"{name}_{j}")
            return names

        # -- the matching ----------------------------------------------------------------------------
        def bank_max(self, q, blocks):
            best = None
            for name in blocks:
                s = torch.matmul(q, getattr(self, name)).amax(dim=-1)
                best = s if best is None else torch.maximum(best, s)
            return best

        def features(self, x, h, w):
            """x: B x 3 x h x w float (0..255) -> (B x N x C unit-norm query cells, gh, gw)."""
            H, W, cell = input_size(pre, stride, h, w)
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
            x = (x - self.mean) / self.std
            maps = list(self.backbone(x))
            gh, gw = H // cell, W // cell
            feats = _combine(maps, (gh, gw), local_avg)                # B x C x gh x gw, unit norm
            return feats.flatten(2).transpose(1, 2), gh, gw

        def vote(self, q):
            """fm's ``_vote``: the largest foreground cosine plus the head's vote (rows of q)."""
            fg_max = self.bank_max(q, self.fg)
            if head_w is not None:
                logit = torch.matmul(q * FEATURE_GAIN, self.head_w)[..., 0] + self.head_b
                fg_max = fg_max + float(meth.head * HEAD_SCALE) * torch.tanh(logit / 4)
            return fg_max

        @staticmethod
        def merge(m):
            """V x gh x gw view margins -> the query's grid (merge_views: the grid, then each view flipped
            back, divided by the number of views)."""
            if views == "flip":
                return ((m[0] + torch.flip(m[1], [-1])) + torch.flip(m[2], [-2])) / 3
            return m[0]

        @staticmethod
        def view_rows(cells, n):
            """Merged-grid ``cells`` (gh x gw bool) -> the rows of every view's flattened cells."""
            if views != "flip":
                return torch.nonzero(cells.flatten())[:, 0]
            return torch.cat([torch.nonzero(cells.flatten())[:, 0],
                              torch.nonzero(torch.flip(cells, [-1]).flatten())[:, 0] + n,
                              torch.nonzero(torch.flip(cells, [-2]).flatten())[:, 0] + 2 * n])

        def margin(self, q, gh, gw):
            """B x N x C query cells -> the merged margin grid (gh x gw)."""
            B = q.shape[0]
            vote = self.vote(q)
            if not prune:
                return self.merge((vote - self.bank_max(q, self.bg)).reshape(B, gh, gw))
            # fm.score_views' pruned search in a fixed number of steps. Strided subsets of the background
            # bank bound every cell's margin from above (a subset's best cosine is at most the bank's):
            # every 512th row for all cells, every 32nd for the cells whose merged bound is then within
            # PRUNE_BAND of the threshold. Matched exactly against the whole bank: (a) the cells within
            # 3 x 3 of a cell whose merged bound is within the band (a pixel above the threshold is
            # interpolated from exact cells only; every other pixel from cells whose exact margins are
            # below it), (b) the TOP_K highest bounds left, (c) after the bounds above the best exact
            # margin are tightened with every 32nd row, every cell whose bound is still above it. The
            # mask and the grid's maximum are exact; the other cells' margins are upper bounds (below
            # the threshold), as in fdseg's predict.
            n = gh * gw
            t = float(post.threshold)
            flat_q = q.reshape(-1, q.shape[-1])
            flat_vote = vote.reshape(-1)
            low = self.bank_max(q, self.coarse[0]).reshape(-1)              # <= each row's exact bg max
            bound = self.merge((flat_vote - low).reshape(B, gh, gw))
            inf = torch.full_like(bound, float("inf"))

            def tighten(low, cells):
                rows = self.view_rows(cells, n)
                return low.scatter(0, rows, torch.maximum(low[rows], self.bank_max(flat_q[rows], self.coarse[1])))

            fine = bound >= t - PRUNE_BAND
            low = tighten(low, fine)
            bound = self.merge((flat_vote - low).reshape(B, gh, gw))
            need = F.max_pool2d((bound >= t - PRUNE_BAND).float()[None, None], 3, 1, 1)[0, 0] > 0

            def exact(low, cells):
                rows = self.view_rows(cells, n)
                return low.scatter(0, rows, self.bank_max(flat_q[rows], self.bg))

            low = exact(low, need)
            left = torch.where(need, -inf, bound).flatten()
            k = torch.minimum(torch.tensor(TOP_K), n)
            top = torch.zeros_like(left).scatter(0, torch.topk(left, k).indices, 1.0).reshape(gh, gw) > 0
            top = top & ~need
            low = exact(low, top)
            done = need | top
            merged = self.merge((flat_vote - low).reshape(B, gh, gw))
            best = torch.where(done, merged, -inf).amax()
            low = tighten(low, (merged > best) & ~done & ~fine)
            merged = self.merge((flat_vote - low).reshape(B, gh, gw))
            low = exact(low, (merged > best) & ~done)
            return self.merge((flat_vote - low).reshape(B, gh, gw))

        # -- the colour rule -------------------------------------------------------------------------
        def colour_index(self, x, h, w):
            """Histogram bin of each pixel (h x w int64) of the image ``x`` (1 x 3 x h x w float32 holding
            its uint8 values), as ColourModel._index. In float32 where that is exact (integers below
            2^24; x * bins / 256 is floored exactly): fewer full-image passes than in int64."""
            b = float(colour.bins)
            if colour.mode != "contrast":
                q = torch.floor(x[0] * (b / 256.0))       # exact: x * bins / 256 has at most 14 significant bits
                return ((q[0] * b + q[1]) * b + q[2]).long()
            g = (x[0, 0] + x[0, 1] + x[0, 2]) / 3.0                       # the uint8 sum is exact in float32
            kh, kw = self.window(h), self.window(w)
            local = _box_mean(_box_mean(g.double(), kh, h, 0).float().double(), kw, w, 1).float()
            d = torch.clamp(g - local, -48.0, 47.99)
            return ((d + 48) * colour.contrast / 96).long()

        @staticmethod
        def window(n):
            k = torch.clamp(torch.round(n.double() * colour.window / colour.frame), min=3).long()
            return k + 1 - k % 2                                        # | 1 for k >= 0

        def forward(self, image):
            h, w = image.shape[2], image.shape[3]
            h = h if isinstance(h, torch.Tensor) else torch.tensor(h)
            w = w if isinstance(w, torch.Tensor) else torch.tensor(w)
            x = image.float()
            xs = torch.cat([x, torch.flip(x, [-1]), torch.flip(x, [-2])]) if views == "flip" else x
            q, gh, gw = self.features(xs, h, w)
            margin = self.margin(q, gh, gw)
            full = F.interpolate(margin[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            mask = full > float(post.threshold)
            if colour is not None:
                mask = mask & self.keep[self.colour_index(x, h, w)]
            score = margin.amax().double() - float(post.threshold)
            if post.ok_level is not None and not post.ok_components:    # the median gate
                mask = mask & (score > float(post.ok_level))
            return margin, full, mask, score

    return Graph().eval()


def input_size(pre, stride: int, h, w):
    """(H, W, cell) as int64 scalar tensors for an image of (traced) h x w pixels: what
    ``pre.input_size(h, w)`` and ``pre.cell(H, W, stride)`` give, in float64 as Python computes them
    (round half to even as Python's ``round``), so that the graph picks every size class as fdseg does."""
    import torch

    from .data.preprocess import STRIP_ASPECT, STRIP_MAX_LONG
    hd, wd = h.double(), w.double()
    mx, mn = torch.maximum(hd, wd), torch.minimum(hd, wd)
    size, m = float(pre.size), float(pre.multiple)

    def scaled(s):                        # _round_to(x * s, m): max(m, round(x * s / m) * m)
        return (torch.clamp(torch.round(hd * s / m) * m, min=m), torch.clamp(torch.round(wd * s / m) * m, min=m))

    fixed = torch.full_like(hd, size)
    if pre.mode == "resize":
        H, W = fixed, fixed
    elif pre.mode == "aspect":
        H, W = scaled(size / mx)
    elif pre.mode == "auto":              # squeezed; large; zoom 2; strip (input_size's order, reversed)
        bh, bw = scaled((2 * pre.size) / mx)
        big = mx >= 2 * pre.size
        H, W = torch.where(big, bh, fixed), torch.where(big, bw, fixed)
        if pre.zoom == 2:
            zh, zw = scaled((4 * pre.size) / mx)
            zoomed = mx >= 4 * pre.size
            H, W = torch.where(zoomed, zh, H), torch.where(zoomed, zw, W)
        sh, sw = scaled(torch.minimum(pre.size / mn, (STRIP_MAX_LONG * pre.size) / mx))
        strip = mx >= STRIP_ASPECT * mn
        H, W = torch.where(strip, sh, H), torch.where(strip, sw, W)
    else:
        raise InputError("resize", f"resize={pre.mode!r} is not exported")
    if pre.mode == "auto":
        cell = torch.where(torch.maximum(H, W) > size, torch.full_like(H, 2.0 * stride),
                           torch.full_like(H, float(stride)))
    else:
        cell = torch.full_like(H, float(stride))
    return H.long(), W.long(), cell.long()


def _combine(maps, grid, local_avg: int):
    """fdseg.features.combine_layers for a traced grid: every map resized to it (combine_layers skips a
    map already of the grid's size; a bilinear resize to its own size is the identity)."""
    from .features import combine_layers
    return combine_layers(maps, grid, local_avg, resize_all=True)


def _box_mean(x, k, n, axis: int):
    """scipy.ndimage.uniform_filter1d(x, k, axis, mode="reflect") of a float64 2-D tensor, for a traced
    odd window ``k`` and axis length ``n``: the edge-repeating ("reflect") padding by index, then window
    sums as differences of a cumulative sum (exact for these values: sums of float32 numbers < 2^24)."""
    import torch
    p = k // 2
    j = torch.arange(n + 2 * p) - p
    src = torch.where(j < 0, -j - 1, torch.where(j >= n, 2 * n - 1 - j, j))
    padded = torch.index_select(x, axis, src)
    c = torch.cumsum(padded, dim=axis)
    zero = torch.zeros_like(torch.index_select(c, axis, torch.zeros(1, dtype=torch.long)))
    c = torch.cat([zero, c], dim=axis)
    i = torch.arange(n)
    return (torch.index_select(c, axis, i + k) - torch.index_select(c, axis, i)) / k.double()


# ------------------------------------------------------------------------------------------- checks

def exportable(seg) -> str | None:
    """None if ``seg`` (fitted) can be exported, else why not (one line)."""
    if seg.state is None:
        return "the segmenter is not fitted"
    s = seg.settings
    if s["method"] != "fm":
        return f"matcher {s['method']!r}: only fm's matching is exported"
    if seg.state.extractor is None:
        return "the matcher uses no backbone feature grid"
    meth = seg.state.method
    if getattr(meth, "query_bg", None):
        return "fm's query_bg (the query's own cells as background evidence) is not exported"
    if seg.state.post.refiner is not None or s.get("refine"):
        return f"the refinement proposer {s.get('refine')!r} is not exported (fit the inspector without refine)"
    pre = seg.state.plan.preprocess
    if pre.mode == "tile":
        return "resize='tile' (tile-by-tile features) is not exported; use resize auto, aspect or resize"
    if pre.antialias:
        return "antialias=True is not exported (ONNX's antialiased resize is not torch's)"
    if seg.query_views not in ("none", "flip"):
        return f"query views {seg.query_views!r} are not exported"
    colour = seg.state.post.colour
    if colour is not None and colour.mode not in ("rgb", "contrast"):
        return f"colour rule mode {colour.mode!r} is not exported"
    if meth.fg is None or meth.bg is None or not len(meth.fg) or not len(meth.bg):
        return "the matcher holds no fitted banks"
    return None


# ------------------------------------------------------------------------------------------- export

def export_inspector(inspector, out: str | Path, *, prune: bool = True, opset: int = 17,
                     chunk: int = DEFAULT_CHUNK, weights: str | Path | None = None, check: bool = True) -> Path:
    """Write the ONNX graph of a fitted inspector (a ``.fdseg`` path or a fitted
    :class:`~fdseg.segmenter.FewShotSegmenter`) to ``out`` (``.onnx``). ``weights``: the backbone's weights
    file on this machine, as for :func:`fdseg.load`. ``chunk``: bank rows per MatMul block (memory:
    query rows x chunk x 4 bytes). ``prune``: match exactly only the cells the mask and the defect score
    depend on (the other cells' margins are upper bounds below the threshold, as in fdseg's predict);
    False: every cell exactly (slower). ``check``: run the written graph (onnxruntime) against fdseg's
    predict on a synthetic image of each input-size class before keeping it. Raises
    :class:`InputError` (one line) where it cannot export."""
    import torch

    from . import __version__
    from .export import onnx_target
    from .inspector import describe as _describe, file_sha256, load

    onnx, out = onnx_target(out)
    if int(chunk) < 1:
        raise InputError("chunk", f"must be a positive number of bank rows, got {chunk!r}")
    source: dict[str, Any]
    if isinstance(inspector, (str, Path)):
        path = Path(inspector)
        with warnings.catch_warnings():           # the fp32 path is the graph's, whatever the file's was
            warnings.simplefilter("ignore")
            seg = load(path, precision="fp32", weights=weights)
        info = _describe(path, check_weights=False)
        source = {"inspector": path.name, "inspector_sha256": file_sha256(path),
                  "inspector_fdseg_version": info.get("fdseg_version"), "fitted_precision": info.get("precision")}
    else:
        seg = inspector
        path = None
        source = {"inspector": None, "inspector_sha256": None, "fitted_precision": seg.settings.get("precision")}
    why = exportable(seg)
    if why is not None:
        raise InputError(path if path is not None else "export", f"cannot export to ONNX: {why}")
    module = _build_module(seg, int(chunk), bool(prune))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    dummy = torch.zeros(1, 3, seg.state.plan.preprocess.size, seg.state.plan.preprocess.size, dtype=torch.uint8)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (dummy,), str(tmp), input_names=[INPUT], output_names=list(OUTPUTS),
                              opset_version=opset, do_constant_folding=True, dynamo=False,
                              dynamic_axes={INPUT: {2: "height", 3: "width"}, "margin": {0: "grid_h", 1: "grid_w"},
                                            "margin_map": {0: "height", 1: "width"},
                                            "mask": {0: "height", 1: "width"}})
        model = onnx.load(str(tmp))
    except FdsegError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:
        tmp.unlink(missing_ok=True)
        line = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise InputError(path or "export", f"cannot export backbone {seg.settings['backbone']!r} to ONNX: "
                                           f"{type(e).__name__}: {line}") from None
    meta = metadata(seg, source, __version__, int(chunk), opset, bool(prune))
    model.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    model.doc_string = ("fdseg inspector: image (uint8 1x3xHxW RGB) -> margin (grid), margin_map, mask (HxW), "
                        "defect_score; metadata key 'fdseg_inspector' (JSON) has the threshold, the OK gate and "
                        "what the graph includes and excludes")
    onnx.save(model, str(tmp))
    if check:
        try:
            _self_check(seg, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    tmp.replace(out)
    return out


def check_images(pre) -> list[np.ndarray]:
    """Synthetic RGB images, one per input-size class the graph must handle (squeezed / large for
    ``resize="auto"``, one otherwise): a smooth texture with a few dark spots."""
    size = pre.size
    shapes = [(size * 3 // 4 + 5, size + 21)]
    if pre.mode == "auto":
        shapes.append((2 * size + 40, int(2.9 * size)))
    elif pre.mode == "aspect":
        shapes = [(size + 40, int(1.7 * size))]
    out = []
    rng = np.random.default_rng(0)
    for h, w in shapes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = 110 + 40 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + rng.normal(0, 6, (h, w))
        for cy, cx in rng.integers(0, min(h, w), (4, 2)):
            base[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] -= 70
        rgb = np.stack([base, base * 0.9 + 10, base * 0.8 + 20], -1)
        out.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return out


def _self_check(seg, path: Path) -> None:
    """The written graph against fdseg's predict on :func:`check_images` (one per size class): catches a
    backbone whose traced graph only holds for the traced input size. Raises InputError."""
    import dataclasses

    import torch

    from .pipeline import finish
    sess = session(path)
    tol = 1e-3 if seg.settings.get("precision") == "fp32" else 0.05
    st = seg.state
    post = st.post
    if post.ok_level is not None and post.ok_components:      # the graph's mask is the one before this gate
        post = dataclasses.replace(post, ok_level=None)
    for rgb in check_images(st.plan.preprocess):
        with torch.inference_mode():
            margin, size = seg.margins(rgb)
            pred = finish(margin, size, post, st.method.temperature, image=rgb)
        got = run(sess, rgb)
        d = abs(float(got["defect_score"]) - pred.defect_score)
        agree = float((got["mask"] == pred.mask).mean())
        if got["margin"].shape != pred.margin_grid.shape or d > tol or agree < 0.99:
            raise InputError(seg.settings["backbone"], f"cannot export to ONNX: the traced graph does not reproduce "
                                                       f"fdseg on a {rgb.shape[1]} x {rgb.shape[0]} test image (grid "
                                                       f"{tuple(got['margin'].shape)} vs {pred.margin_grid.shape}, "
                                                       f"defect score off by {d:.3g}, mask agreement {agree:.4f}): "
                                                       f"the backbone's graph depends on the input size")


def metadata(seg, source: dict, version: str, chunk: int, opset: int, prune: bool = True) -> dict:
    """The JSON description stored in the model (``metadata_props[META_KEY]``)."""
    st = seg.state
    pre, post, meth, colour = st.plan.preprocess, st.post, st.method, st.post.colour
    stride = st.extractor.config.stride
    size = pre.size
    if post.ok_level is None:
        gate = {"mode": "off", "level": None, "in_graph": True}
    elif post.ok_components:
        soft = bool(getattr(post, "ok_soft", False))
        gate = {"mode": "auto", "level": float(post.ok_level), "soft": soft, "in_graph": False,
                "rule": ("with the mask's 8-connected components and peak = margin_map - threshold: a component "
                         "whose largest peak is not above the level is removed" +
                         (" except its pixels whose peak plus that largest peak exceeds the level (soft)"
                          if soft else "") + "; apply with fdseg.export_inspector.gate_and_verdict")}
    else:
        gate = {"mode": "median", "level": float(post.ok_level), "in_graph": True,
                "rule": "defect_score <= level: the mask is emptied (done in the graph)"}
    classes = {"squeezed": f"long side < {2 * size}: {size} x {size}, cell {stride} px, "
                           f"grid {size // stride} x {size // stride}"}
    if pre.mode == "resize":
        classes = {"squeezed": f"every image: {size} x {size}, cell {stride} px, "
                               f"grid {size // stride} x {size // stride}"}
    elif pre.mode == "aspect":
        classes = {"aspect": f"long side {size} (aspect kept, sides rounded to {pre.multiple}), cell {stride} px"}
    else:
        classes["large"] = (f"long side >= {2 * size}: long side {2 * size}, aspect kept (sides rounded to "
                            f"{pre.multiple}), cell {2 * stride} px, grid {size // stride} cells on the long side")
        if pre.zoom == 2:
            classes["zoom2"] = (f"long side >= {4 * size}: long side {4 * size}, aspect kept, cell {2 * stride} px, "
                                f"grid {2 * size // stride} cells on the long side")
        classes["strip"] = ("long side >= 4 x short side: short side scaled to the input size (long side at most "
                            f"16 x {size}), cell {2 * stride} px")
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fdseg_version": version, **source,
        "graph_precision": "fp32", "opset": opset,
        "input": {"name": INPUT, "dtype": "uint8", "shape": "1 x 3 x H x W", "channels": "RGB",
                  "note": "the image at its own size; H and W are dynamic"},
        "outputs": {"margin": "grid_h x grid_w float32: the margin grid (> threshold = defect)",
                    "margin_map": "H x W float32: the margin upsampled (bilinear) to the image",
                    "mask": "H x W bool: margin_map > threshold, the colour rule, the median OK gate",
                    "defect_score": "float64: max(margin) - threshold (> 0: some cell matched as defect)"},
        "threshold": float(post.threshold), "temperature": float(meth.temperature),
        "ok_gate": gate, "min_cells": 1.0,
        "preprocess": {"mode": pre.mode, "size": size, "zoom": pre.zoom, "multiple": pre.multiple,
                       "stride": stride, "local_avg": st.extractor.config.local_avg, "size_classes": classes},
        "query_views": seg.query_views,
        "backbone": seg.settings["backbone"],
        "matching": {"method": "fm", "fg_cells": int(len(meth.fg)), "bg_cells": int(len(meth.bg)),
                     "channels": int(meth.fg.shape[1]), "head": float(meth.head),
                     "bg_cover": meth.bg_cover, "bank_block_rows": chunk, "pruned": prune,
                     "margins": ("exact where the mask can depend on them and at the grid's maximum; elsewhere "
                                 "upper bounds below the threshold (as fdseg's predict)") if prune else "exact"},
        "colour": None if colour is None else {
            "mode": colour.mode, "tau": float(colour.tau), "bins": colour.bins, "contrast": colour.contrast,
            "window": colour.window, "frame": colour.frame, "in_graph": True},
        "plan": str(st.plan),
        "includes": list(INCLUDES), "excludes": list(EXCLUDES),
    }


# ------------------------------------------------------------------------------------------- running it

def read_metadata(path_or_session) -> dict:
    """The JSON description of an exported graph (a path or an ``onnxruntime.InferenceSession``)."""
    if isinstance(path_or_session, (str, Path)):
        import onnx
        m = onnx.load(str(path_or_session), load_external_data=False)
        props = {p.key: p.value for p in m.metadata_props}
    else:
        props = path_or_session.get_modelmeta().custom_metadata_map
    if META_KEY not in props:
        raise InputError(str(path_or_session), "not an fdseg inspector graph: no 'fdseg_inspector' metadata")
    return json.loads(props[META_KEY])


def session(path: str | Path, threads: int = 1):
    """An onnxruntime session of an exported graph on the CPU with ``threads`` intra-op threads."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(sess, rgb: np.ndarray) -> dict[str, np.ndarray]:
    """One H x W x 3 uint8 RGB image through the graph -> its outputs by name (numpy; no torch)."""
    x = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[..., :3].transpose(2, 0, 1)[None])
    return dict(zip(OUTPUTS, sess.run(list(OUTPUTS), {INPUT: x})))


def gate_and_verdict(out: dict[str, np.ndarray], meta: dict) -> dict[str, Any]:
    """The graph's outputs -> what ``finish`` adds after the mask: the ``auto`` OK gate (mask components),
    the verdict and the boxes, with numpy and scipy only. Returns ``mask`` (final), ``defect_score``,
    ``is_defective``, ``largest_cells``, ``ok_gated``, ``boxes`` (x0, y0, x1, y1; exclusive ends)."""
    from scipy import ndimage
    mask = np.asarray(out["mask"], bool)
    grid = np.asarray(out["margin"])
    t = float(meta["threshold"])
    gate = meta.get("ok_gate") or {}
    level = gate.get("level")
    eight = np.ones((3, 3), bool)
    had = bool(mask.any())
    if had and level is not None and gate.get("mode") == "auto":
        peak = np.asarray(out["margin_map"], np.float32) - np.float32(t)
        lab, n = ndimage.label(mask, structure=eight)
        peaks = np.asarray(ndimage.maximum(peak, lab, np.arange(1, n + 1)))
        if not (peaks > level).all():
            if gate.get("soft"):
                mask = mask & (peak + np.concatenate([[-np.inf], peaks])[lab] > level)
            else:
                mask = np.concatenate([[False], peaks > level])[lab]
    gated = (had and not mask.any()) if gate.get("mode") == "auto" and level is not None else \
        (gate.get("mode") == "median" and float(out["defect_score"]) <= level)
    boxes, largest = [], 0
    if mask.any():
        lab, _ = ndimage.label(mask, structure=eight)
        boxes = [(int(sl[1].start), int(sl[0].start), int(sl[1].stop), int(sl[0].stop))
                 for sl in ndimage.find_objects(lab) if sl is not None]
        largest = int(np.bincount(lab.ravel())[1:].max())
    cells = largest * grid.size / mask.size if mask.size else 0.0
    min_cells = float(meta.get("min_cells", 1.0))
    return {"mask": mask, "defect_score": float(out["defect_score"]),
            "is_defective": bool(cells >= min_cells and cells > 0),
            "largest_cells": float(cells), "ok_gated": bool(gated), "boxes": boxes}


__all__ = ["EXCLUDES", "FORMAT", "INCLUDES", "META_KEY", "OUTPUTS", "export_inspector", "exportable", "input_size",
           "gate_and_verdict", "metadata", "read_metadata", "run", "session"]
