"""``meta``: a trained few-shot segmentation network (the paper's meta-learning baseline).

PANet-style prototype network on the frozen backbone's feature grid, trained episodically
by ``fdseg train-meta`` (fdseg/train_meta.py) and loaded here from its checkpoint:

* the grid average-pooled ``pool`` x ``pool`` (default 2: 32 x 32 cells at 256 px), then a
  learned 1 x 1 projection of the (frozen, unit-norm) backbone features to ``dim``
  channels, L2-normalised per cell;
* foreground / background prototypes by masked average pooling of the supports'
  projected cells (weighted by mask coverage; K supports pooled together);
* margin = ``scale * (cos(q, fg) - cos(q, bg))`` plus a light learned head (two 3 x 3
  convolutions on the two cosine maps and the projected query features) that refines it;
  the margin is a logit: > 0 = defect.

Training adds PANet's prototype-alignment loss (prototypes from the query's prediction must
segment the support); see :func:`fdseg.train_meta.episode_loss`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, Query, Support
from .registry import register_method
from ..checkpoint import read_torch_file
from ..errors import InputError

CHECKPOINT_FORMAT = "fdseg-meta"
CHECKPOINT_VERSION = 1


class MetaProtoNet(nn.Module):
    """Feature grids (B x C x H x W, frozen) -> prototype matching logits (B x H x W)."""

    def __init__(self, in_channels: int, dim: int = 64, hidden: int = 32, pool: int = 2, scale: float = 10.0):
        super().__init__()
        self.arch = {"in_channels": int(in_channels), "dim": int(dim), "hidden": int(hidden), "pool": int(pool)}
        self.pool = int(pool)
        self.proj = nn.Conv2d(in_channels, dim, 1)
        self.head = nn.Sequential(nn.Conv2d(dim + 2, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, 1, 3, padding=1))
        nn.init.zeros_(self.head[2].weight)     # starts as pure prototype matching
        nn.init.zeros_(self.head[2].bias)
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """B x C x H x W backbone grid -> B x dim x H/pool x W/pool unit-norm embedding."""
        if self.pool > 1:
            feats = F.avg_pool2d(feats, self.pool, ceil_mode=True)
        return F.normalize(self.proj(feats), dim=1)

    def pool_mask(self, cov: torch.Tensor) -> torch.Tensor:
        """B x H x W coverage -> the embedding's grid (area average)."""
        return F.avg_pool2d(cov[:, None], self.pool, ceil_mode=True)[:, 0] if self.pool > 1 else cov

    @staticmethod
    def prototypes(emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """emb N x D x H x W, weight N x H x W in [0, 1] (fg) -> 2 x D unit (bg, fg) pooled over N."""
        w = weight.unsqueeze(1).to(emb.dtype)
        fg = (emb * w).sum((0, 2, 3)) / w.sum().clamp_min(1e-6)
        bg = (emb * (1 - w)).sum((0, 2, 3)) / (1 - w).sum().clamp_min(1e-6)
        return F.normalize(torch.stack([bg, fg]), dim=1)

    def match(self, emb: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """emb B x D x H x W, protos B x 2 x D (or 2 x D) -> logits B x H x W."""
        if protos.dim() == 2:
            protos = protos.unsqueeze(0).expand(emb.shape[0], -1, -1)
        sim = torch.einsum("bkd,bdhw->bkhw", protos, emb)          # B x 2 x H x W cosines
        base = self.log_scale.exp() * (sim[:, 1] - sim[:, 0])
        return base + self.head(torch.cat([sim, emb], 1))[:, 0]

    def forward(self, support_feats: torch.Tensor, support_cov: torch.Tensor,
                query_feats: torch.Tensor) -> torch.Tensor:
        """One episode: K x C x H x W, K x H x W, Q x C x H x W -> Q x H x W logits."""
        return self.match(self.embed(query_feats),
                          self.prototypes(self.embed(support_feats), self.pool_mask(support_cov)))


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a ``train-meta`` checkpoint (weights only, never code)."""
    path = Path(path)
    ck = read_torch_file(path, missing="meta checkpoint file does not exist (train one with `fdseg train-meta`)",
                         unreadable="not a readable torch checkpoint")
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InputError(path, "not an fdseg meta checkpoint (expected one written by `fdseg train-meta`)")
    if int(ck.get("version", -1)) != CHECKPOINT_VERSION:
        raise InputError(path, f"meta checkpoint version {ck.get('version')} is not supported "
                               f"(this fdseg reads version {CHECKPOINT_VERSION})")
    return ck


def build_net(ck: dict, source: str | Path) -> MetaProtoNet:
    """The network a checkpoint describes, with its weights; a mismatch is a clear error."""
    try:
        net = MetaProtoNet(**ck["arch"])
        net.load_state_dict(ck["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise InputError(source, f"checkpoint does not fit the meta network architecture "
                                 f"{ck.get('arch')}: {str(e).splitlines()[0][:200]}") from None
    return net.eval()


@register_method("meta", summary="trained prototype network (PANet-style meta-learning baseline); "
                                 "needs checkpoint=PATH from `fdseg train-meta`", needs_checkpoint=True)
class MetaLearned(Method):
    temperature = 1.0          # margins are logits
    stacks_supports = True     # support grids are stacked: rotated views (transposed grids) do not fit

    def __init__(self, checkpoint: str | Path | None = None):
        if checkpoint is None:
            raise InputError("--method-option", "method 'meta' needs checkpoint=PATH "
                                                "(a file written by `fdseg train-meta`)")
        self.checkpoint = Path(checkpoint)
        self.ck = load_checkpoint(self.checkpoint)
        self.net = build_net(self.ck, self.checkpoint)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.protos: torch.Tensor | None = None

    def to(self, device) -> "MetaLearned":
        self.net.to(device)
        if self.protos is not None:
            self.protos = self.protos.to(device)
        return self

    def _check(self, feats: torch.Tensor) -> None:
        want = self.net.arch["in_channels"]
        if feats.shape[0] != want:
            fc = self.ck.get("features", {})
            raise InputError(self.checkpoint, f"trained on {want}-channel features of backbone "
                                              f"{fc.get('backbone')!r}, but the segmenter gives "
                                              f"{feats.shape[0]} channels: use --backbone {fc.get('backbone')}")

    @torch.inference_mode()
    def fit(self, supports: list[Support]) -> None:
        for s in supports:
            self._check(s.features)
        dev = next(self.net.parameters()).device
        feats = torch.stack([s.features.float() for s in supports]).to(dev)
        cov = torch.stack([s.coverage.float() for s in supports]).to(dev)
        if float(cov.sum()) <= 0 or float((1 - cov).sum()) <= 0:
            raise InputError("supports", "supports give no foreground or no background to pool")
        self.protos = self.net.prototypes(self.net.embed(feats), self.net.pool_mask(cov))

    @torch.inference_mode()
    def score(self, query: Query) -> torch.Tensor:
        if self.protos is None:
            raise RuntimeError("fit() the method before scoring")
        self._check(query.features)
        dev = next(self.net.parameters()).device
        return self.net.match(self.net.embed(query.features.float()[None].to(dev)), self.protos)[0]

    def describe(self) -> dict:
        return {"method": self.name, "checkpoint": str(self.checkpoint), "arch": self.net.arch,
                "trained_on": self.ck.get("train", {}).get("train_datasets"),
                "steps": self.ck.get("step")}
