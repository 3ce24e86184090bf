"""Images -> L2-normalised multi-layer feature grids (the input of every matcher).

Each backbone layer is (optionally) locally averaged, L2-normalised per cell,
bilinearly resized to one grid of ``input / stride`` cells and concatenated; the
concatenation is L2-normalised again so that a dot product is a cosine.
Large inputs in ``tile`` mode are processed tile by tile and stitched, each grid
cell taken from the tile whose centre is nearest (no seams from padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .backbones.base import Backbone
from .data.preprocess import Preprocess, resize_image, to_tensor
from .errors import InputError


@dataclass(frozen=True)
class FeatureConfig:
    stride: int = 4          # grid cell size in network-input pixels (256 input -> 64 x 64 grid)
    local_avg: int = 1       # k x k average of each layer before normalising (1 = off)

    def __post_init__(self):
        if self.stride not in (1, 2, 4, 8, 16, 32):
            raise InputError("--feature-stride", f"must be a power of two up to 32, got {self.stride}")
        if self.local_avg < 1 or self.local_avg % 2 == 0:
            raise InputError("--local-avg", f"must be an odd number >= 1, got {self.local_avg}")


def combine_layers(maps: list[torch.Tensor], grid: tuple[int, int], local_avg: int = 1,
                   resize_all: bool = False) -> torch.Tensor:
    """B x C_i x h_i x w_i maps -> B x sum(C_i) x gh x gw unit-norm features. ``resize_all``: resize every
    map, also one already of the grid's size (the identity: for a graph traced with a symbolic grid)."""
    outs = []
    for m in maps:
        m = m.float()
        if local_avg > 1:
            m = F.avg_pool2d(m, local_avg, stride=1, padding=local_avg // 2, count_include_pad=False)
        m = F.normalize(m, dim=1)
        if resize_all or tuple(m.shape[-2:]) != tuple(grid):
            m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
        outs.append(m)
    return F.normalize(torch.cat(outs, 1), dim=1)


class LayerMaps:
    """One image's backbone maps as the backbone gave them, before :func:`combine_layers` resizes them
    to the grid: a compact form of the image's feature grid, which :meth:`grid` rebuilds exactly
    (the same computation the extractor does). EfficientNet-Lite0's stride-8 and stride-16 maps hold
    17 floats per stride-4 grid cell against the grid's 152, and in bf16 under autocast: what the
    feature cache keeps (1/18 of the grid's bytes)."""
    __slots__ = ("maps", "size", "local_avg")

    def __init__(self, maps: list[torch.Tensor], size: tuple[int, int], local_avg: int = 1):
        # maps: 1 x C_i x h_i x w_i each
        self.maps, self.size, self.local_avg = tuple(maps), (int(size[0]), int(size[1])), int(local_avg)

    def grid(self) -> torch.Tensor:
        """The C x gh x gw unit-norm feature grid."""
        return combine_layers(list(self.maps), self.size, self.local_avg)[0]

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.maps)


def as_grid(features: "LayerMaps | torch.Tensor") -> torch.Tensor:
    """A feature grid from either form the extractor gives (:class:`LayerMaps` or a grid)."""
    return features.grid() if isinstance(features, LayerMaps) else features


def _owners(starts: list[int], size: int, n: int, stride: int) -> list[tuple[int, int]]:
    """For tiles starting at ``starts`` along an axis of n input pixels, the grid
    range [a, b) each tile owns (split at the middle of each overlap)."""
    bounds = [0]
    for s0, s1 in zip(starts, starts[1:]):
        mid = (s1 + s0 + size) // 2
        bounds.append(int(round(mid / stride)))
    bounds.append(n // stride)
    return list(zip(bounds[:-1], bounds[1:]))


class FeatureExtractor:
    """Backbone + preprocessing + grid: ``rgb uint8 HxWx3 -> C x gh x gw``."""

    def __init__(self, backbone: Backbone, preprocess: Preprocess | None = None,
                 config: FeatureConfig | None = None, device: str | torch.device = "cpu",
                 amp: bool | None = None, channels_last: bool = True, fold_batchnorm: bool = True):
        # BatchNorm folded into the convolutions where the backbone can (an eval-mode backbone only; in
        # place: the extractor owns its backbone, as create_backbone gives each segmenter its own)
        if fold_batchnorm and not backbone.training and hasattr(backbone, "fold_batchnorm"):
            backbone = backbone.fold_batchnorm()
        self.backbone = backbone
        self.preprocess = preprocess or Preprocess()
        self.config = config or FeatureConfig()
        self.device = torch.device(device)
        self.backbone.to(self.device)
        # bf16 autocast for the backbone where the hardware runs it fast (a GPU; not an AVX2 CPU)
        from .hardware import fast_bf16
        self.amp = fast_bf16(self.device) if amp is None else amp
        # channels-last convolutions: 3-4x faster under bf16 autocast on the CPU (oneDNN), 1.1-1.4x in fp32;
        # features equal to the default layout's within 2e-7 (docs/speed-profile.md)
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if self.preprocess.size % self.config.stride:
            raise InputError("--feature-stride", "input size must be a multiple of the feature stride")

    def images_per_pass(self, n: int) -> int:
        """Images of one size run through the backbone together: on the CPU one at a time (as fast per
        image as batches of 2 or 4 on one or two threads, a zoomed image's activations not multiplied
        by the batch, and one set of oneDNN kernels per input size, shared by the fit's and the queries'
        passes: BENCHMARKS.md, speed); elsewhere (a GPU) all ``n`` at once. Per-image features equal
        the batch's (tests/test_matching_speed.py)."""
        return 1 if self.device.type == "cpu" else max(1, n)

    @property
    def channels(self) -> int:
        return int(sum(self.backbone.channels))

    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        H, W = self.preprocess.input_size(h, w)
        c = self.preprocess.cell(H, W, self.config.stride)
        return H // c, W // c

    def _maps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Normalised input B x 3 x H x W -> the backbone's maps and the grid (H/stride, W/stride)."""
        c = self.preprocess.cell(x.shape[-2], x.shape[-1], self.config.stride)
        grid = (x.shape[-2] // c, x.shape[-1] // c)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            maps = self.backbone(x)
        return list(maps), grid

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input B x 3 x H x W -> B x C x H/stride x W/stride."""
        maps, grid = self._maps(x)
        return combine_layers(maps, grid, self.config.local_avg)

    @torch.inference_mode()
    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        return self.batch([rgb])[0]

    @torch.inference_mode()
    def batch(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """Feature grids of several images; same-size inputs are run as one batch."""
        return [as_grid(f) for f in self.batch_maps(images)]

    @torch.inference_mode()
    def batch_maps(self, images: list[np.ndarray]) -> list["LayerMaps | torch.Tensor"]:
        """Features of several images in their compact form (:class:`LayerMaps`, one per image; a
        tiled input's stitched grid as it is); same-size inputs are run as one batch."""
        out: list[LayerMaps | torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(self.preprocess.input_size(*im.shape[:2]), []).append(i)
        for (H, W), same in by_size.items():
            tiles = self.preprocess.tiles(H, W)
            per = self.images_per_pass(len(same))
            for start in range(0, len(same), per):
                idx = same[start:start + per]
                xs = [resize_image(to_tensor(images[i], self.device), (H, W), self.preprocess.antialias)
                      for i in idx]
                x = self.backbone.normalize(torch.cat(xs))
                if len(tiles) == 1:
                    maps, grid = self._maps(x)
                    for j, i in enumerate(idx):
                        # each image's own 1 x C x h x w copy (a view would keep the batch's tensor alive),
                        # in the batch's memory layout, so that its grid is bit-identical to the batch's;
                        # a batch of one is its own
                        own = maps if len(idx) == 1 else [m[j:j + 1].clone() for m in maps]
                        out[i] = LayerMaps(own, grid, self.config.local_avg)
                else:
                    feats = self._tiled(x, tiles)
                    for j, i in enumerate(idx):
                        out[i] = feats[j].clone() if len(idx) > 1 else feats[j]
        return out  # type: ignore[return-value]

    def _tiled(self, x: torch.Tensor, tiles: list[tuple[int, int, int, int]]) -> torch.Tensor:
        s = self.config.stride
        H, W = x.shape[-2:]
        ys = sorted({t[0] for t in tiles})
        xs = sorted({t[1] for t in tiles})
        th, tw = tiles[0][2], tiles[0][3]
        own_y, own_x = _owners(ys, th, H, s), _owners(xs, tw, W, s)
        out = None
        for iy, y0 in enumerate(ys):
            for ix, x0 in enumerate(xs):
                f = self._forward(x[:, :, y0:y0 + th, x0:x0 + tw])
                if out is None:
                    out = f.new_zeros((x.shape[0], f.shape[1], H // s, W // s))
                (a, b), (c, d) = own_y[iy], own_x[ix]
                gy, gx = y0 // s, x0 // s
                out[:, :, a:b, c:d] = f[:, :, a - gy:b - gy, c - gx:d - gx]
        return out
