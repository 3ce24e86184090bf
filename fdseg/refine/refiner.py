"""Refiner: a proposer + the fusion rules, applied to one image's predicted mask."""
from __future__ import annotations

import inspect

import numpy as np

from .fusion import FusionRules, refine
from .proposers import PROPOSERS, Proposer
from .proposers.common import grow_labels, grow_masks
from ..errors import InputError

RULE_KEYS = set(FusionRules.__dataclass_fields__)


class Refiner:
    """``Refiner("superpixel", {"scale": 200, "min_overlap": 0.3})``: fusion-rule keys go to
    :class:`FusionRules`, the others to the proposer."""

    def __init__(self, proposer: str | Proposer, options: dict | None = None, device: str | None = None):
        opts = dict(options or {})
        self.rules = FusionRules(**{k: opts.pop(k) for k in list(opts) if k in RULE_KEYS})
        if not isinstance(proposer, Proposer):
            factory = PROPOSERS.entry(proposer).factory
            if device is not None and "device" not in opts and \
                    "device" in inspect.signature(factory.__init__ if isinstance(factory, type) else factory).parameters:
                opts["device"] = device
            proposer = factory(**opts)
        self.proposer = proposer

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The refined mask at ``mask``'s resolution. A proposer with ``at_mask_resolution`` (superpixel)
        sees the image resized to the mask; the others (SAM models resize by themselves) see it as
        given and their candidates are resized (nearest) to the mask."""
        if image is None:
            raise InputError("refine", "refinement needs the query image")
        if getattr(self.proposer, "at_mask_resolution", False) and image.shape[:2] != mask.shape:
            from ..data.preprocess import resize_image, to_tensor
            image = resize_image(to_tensor(image), mask.shape).round().clamp(0, 255)[0].permute(1, 2, 0).byte().numpy()
        cands = self.proposer.propose(image)
        if cands.shape[-2:] != mask.shape:
            cands = grow_labels(cands, mask.shape) if cands.ndim == 2 else grow_masks(cands, mask.shape)
        return refine(mask, cands, self.rules)

    def describe(self) -> dict:
        return {**self.proposer.describe(), **{k: v for k, v in self.rules.__dict__.items()}}
