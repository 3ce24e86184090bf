"""``fm``: the paper's feature matching rule (GFDS MatchingNet).

Every query cell takes its highest cosine similarity to all support foreground
cells and to all support background cells (the K supports' cells pooled); the
margin ``max_fg - max_bg`` is > 0 where foreground wins (argmax).

Speed options (see BENCHMARKS.md for what they cost and save):

* ``precision``: 'auto' (bf16 matmul only where the hardware makes it fast), 'fp32', 'bf16'.
* ``bg_coreset``: keep only part of the background bank, chosen by greedy k-center
  (PatchCore). A float in (0, 1] keeps that fraction, an int that many cells,
  None keeps all (exact).

Beyond the paper (``head``): a linear head fitted on the supports' own cells (class-balanced
logistic regression on the cosine features, L2-regularised, a few L-BFGS steps at ``fit``) adds a
bounded vote to the margin: ``margin + head * 0.1 * tanh(logit / 4)``. It learns which channels
separate this defect from this background, which plain cosine weighs equally; ``head=0`` is the
paper's rule. See BENCHMARKS.md (accuracy section) for what it adds.

Beyond the paper (``query_bg``): the query's own cells join the background evidence.
A cell's background score becomes the larger of its best support-background cosine and
its k-th best cosine to the query's other cells (more than ``query_bg_radius`` cells
away), with k = ``query_bg`` x (the supports' defect fraction) x (cells): a cell whose
appearance is common in the query is unlikely to be the (rare) defect.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, Query, Support, support_cells
from .registry import register_method
from .similarity import DEFAULT_CHUNK, greedy_coreset, kth_self_similarity, max_similarity
from ..errors import InputError
from ..hardware import matmul_dtype


def coreset_size(n: int, spec: float | int | None) -> int:
    if spec is None:
        return n
    if isinstance(spec, float) and 0 < spec <= 1:
        return max(1, min(n, int(round(n * spec))))
    if isinstance(spec, int) and spec > 0:
        return min(n, spec)
    raise InputError("bg_coreset", f"expected a fraction in (0, 1] or a positive count, got {spec!r}")


HEAD_SCALE = 0.1        # the head's vote is at most +-head * 0.1 in cosine-margin units
FEATURE_GAIN = 10.0     # cosine features are scaled by this before the logistic regression


def fit_linear_head(fg: torch.Tensor, bg: torch.Tensor, l2: float = 1e-3, steps: int = 60) -> torch.Tensor:
    """Class-balanced, L2-regularised logistic regression fg-vs-bg on unit feature rows.
    Returns [w (C), b] as one C+1 vector (fitted on the CPU in fp32, L-BFGS)."""
    with torch.inference_mode(False), torch.enable_grad():
        # clone: the features may be inference tensors, which autograd cannot save
        x = torch.cat([fg, bg]).float().cpu().clone() * FEATURE_GAIN
        y = torch.cat([torch.ones(len(fg)), torch.zeros(len(bg))])
        wts = torch.where(y > 0, 0.5 / len(fg), 0.5 / len(bg))
        w = torch.zeros(x.shape[1] + 1, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logit = x @ w[:-1] + w[-1]
            loss = (wts * F.binary_cross_entropy_with_logits(logit, y, reduction="none")).sum() + l2 * (w[:-1] @ w[:-1])
            loss.backward()
            return loss
        opt.step(closure)
    return w.detach().to(fg.device)


def head_logits(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (q.float() * FEATURE_GAIN) @ w[:-1] + w[-1]


@register_method("fm", summary="feature matching: max cosine to support foreground vs background cells (paper)")
class FeatureMatching(Method):
    temperature = 0.05

    def __init__(self, fg_min: float = 0.0, chunk: int = DEFAULT_CHUNK, precision: str = "auto",
                 bg_coreset: float | int | None = None, seed: int = 0,
                 query_bg: float | None = None, query_bg_radius: int = 1, query_bg_min_k: int = 3,
                 head: float = 1.0, head_l2: float = 1e-3, head_steps: int = 60):
        self.fg_min, self.chunk, self.precision = fg_min, chunk, precision
        if head < 0 or head_l2 < 0 or head_steps < 1:
            raise InputError("fm head", f"need head >= 0, head_l2 >= 0, head_steps >= 1; got {head}, {head_l2}, {head_steps}")
        self.head, self.head_l2, self.head_steps = float(head), float(head_l2), int(head_steps)
        self.head_w: torch.Tensor | None = None
        self.bg_coreset, self.seed = bg_coreset, seed
        self.query_bg, self.query_bg_radius, self.query_bg_min_k = query_bg, query_bg_radius, query_bg_min_k
        matmul_dtype(precision)   # validate early
        self.fg: torch.Tensor | None = None
        self.bg: torch.Tensor | None = None

    def fit(self, supports: list[Support]) -> None:
        fgs, bgs, fracs = [], [], []
        for s in supports:
            f = s.features.flatten(1).T          # cells x C
            fg, bg = support_cells(s.coverage, self.fg_min)
            fgs.append(f[fg])
            bgs.append(f[bg])
            fracs.append(float(fg.float().mean()))
        fg, bg = torch.cat(fgs), torch.cat(bgs)
        if not len(fg) or not len(bg):
            raise InputError("supports", "supports give no foreground or no background feature cells")
        k = coreset_size(len(bg), self.bg_coreset)
        if k < len(bg):
            bg = bg[greedy_coreset(bg, k, self.seed)]
        if self.head:
            self.head_w = fit_linear_head(fg, bg, self.head_l2, self.head_steps)
        self.fg, self.bg = fg.contiguous(), bg.contiguous()
        self.fg_fraction = sum(fracs) / len(fracs)
        self.dtype = matmul_dtype(self.precision, fg.device)

    def score(self, query: Query) -> torch.Tensor:
        if self.fg is None:
            raise RuntimeError("fit() the method before scoring")
        c, h, w = query.features.shape
        q = query.features.flatten(1).T
        bg = max_similarity(q, self.bg, self.chunk, self.dtype)
        if self.query_bg:
            k = max(self.query_bg_min_k, int(round(self.query_bg * self.fg_fraction * h * w)))
            bg = torch.maximum(bg, kth_self_similarity(q, h, w, k, self.query_bg_radius, self.chunk))
        margin = max_similarity(q, self.fg, self.chunk, self.dtype) - bg
        if self.head and self.head_w is not None:
            margin = margin + self.head * HEAD_SCALE * torch.tanh(head_logits(q, self.head_w) / 4)
        return margin.view(h, w)

    def describe(self) -> dict:
        return {"method": self.name, "fg_cells": int(len(self.fg)) if self.fg is not None else 0,
                "bg_cells": int(len(self.bg)) if self.bg is not None else 0,
                "matmul": str(getattr(self, "dtype", "")).replace("torch.", ""), "head": self.head}
