"""``sam2_auto``: sam2's automatic mask generator (a grid of point prompts) as the candidates."""
from __future__ import annotations

import numpy as np
import torch

from .common import grow_masks
from .registry import Proposer, register_proposer


@register_proposer("sam2_auto", summary="SAM2 automatic mask generator (needs a SAM2 config + checkpoint)",
                   extra="sam", needs_weights=True)
class Sam2Auto(Proposer):
    def __init__(self, checkpoint: str | None = None, config: str | None = None, device: str = "cpu",
                 points_per_side: int = 32, points_per_batch: int = 64, pred_iou_thresh: float = 0.8,
                 stability_score_thresh: float = 0.95, min_mask_region_area: int = 0):
        from ...sam.build import build_sam2, fit_feature_sizes, require_sam2
        require_sam2("the sam2_auto proposer")
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        self.device = torch.device(device)
        self.model = build_sam2(config, checkpoint, kind="image", device=self.device)
        self.generator = SAM2AutomaticMaskGenerator(
            self.model, points_per_side=points_per_side, points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
            min_mask_region_area=min_mask_region_area, output_mode="binary_mask")
        fit_feature_sizes(self.generator.predictor)
        self.checkpoint = str(checkpoint)

    def propose(self, image: np.ndarray) -> np.ndarray:
        from ...sam.build import autocast
        h, w = image.shape[:2]
        with torch.inference_mode(), autocast(self.device):
            anns = self.generator.generate(np.ascontiguousarray(image))
        if not anns:
            return np.zeros((0, h, w), bool)
        return grow_masks(np.stack([np.asarray(a["segmentation"], bool) for a in anns]), (h, w))

    def describe(self) -> dict:
        return {"refine": self.name, "checkpoint": self.checkpoint}
