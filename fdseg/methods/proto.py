"""``proto``: masked-average-pooling prototypes (PANet's training-free core).

One foreground prototype (coverage-weighted mean of the supports' feature cells)
and one background prototype (weighted by 1 - coverage); each query cell's margin
is ``cos(q, fg) - cos(q, bg)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, Query, Support
from .registry import register_method
from ..errors import InputError


@register_method("proto", summary="prototype matching: masked average pooling, cosine to fg vs bg prototype")
class PrototypeMatching(Method):
    temperature = 0.05

    def __init__(self):
        self.protos: torch.Tensor | None = None

    def fit(self, supports: list[Support]) -> None:
        fg_sum, bg_sum, fg_w, bg_w = 0.0, 0.0, 0.0, 0.0
        for s in supports:
            f = s.features.flatten(1)                  # C x cells
            cov = s.coverage.flatten().to(f.dtype)
            fg_sum = fg_sum + f @ cov
            bg_sum = bg_sum + f @ (1 - cov)
            fg_w, bg_w = fg_w + float(cov.sum()), bg_w + float((1 - cov).sum())
        if fg_w <= 0 or bg_w <= 0:
            raise InputError("supports", "supports give no foreground or no background to pool")
        self.protos = F.normalize(torch.stack([bg_sum / bg_w, fg_sum / fg_w]), dim=1)   # 2 x C

    def score(self, query: Query) -> torch.Tensor:
        if self.protos is None:
            raise RuntimeError("fit() the method before scoring")
        c, h, w = query.features.shape
        sim = self.protos @ query.features.flatten(1)   # 2 x cells
        return (sim[1] - sim[0]).view(h, w)
