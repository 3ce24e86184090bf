"""``fm_prompt`` (beyond the paper; PerSAM / Matcher style): FM's score map prompts SAM2.

``fm`` scores the query; each of its largest connected defect regions (up to ``max_regions``)
gives SAM2's image predictor a box (the region's bounding box, grown by ``box_margin`` of its
size) and a positive point (the region's highest FM margin); ``negative_point`` adds the
query's lowest-margin cell as a negative point. SAM2's mask logits replace FM's coarse boundary
inside the union of the prompted masks. No FM region -> FM's (empty) answer.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .base import Method, Query, Support
from .fm import FeatureMatching
from .registry import register_method
from ..errors import InputError


@register_method("fm_prompt", summary="fm score map -> box + point prompts -> SAM2 image predictor mask",
                 extra="sam")
class FmPrompt(Method):
    uses_features = True
    needs_image = True
    temperature = 1.0

    def __init__(self, checkpoint: str | None = None, config: str | None = None, max_regions: int = 3,
                 box_margin: float = 0.1, negative_point: bool = True, **fm_options):
        from ..sam.build import build_sam2, fit_feature_sizes, require_sam2
        require_sam2("the fm_prompt method")
        if checkpoint is None:
            raise InputError("--sam2-checkpoint", "fm_prompt needs a SAM2 checkpoint (e.g. sam2.1_hiera_tiny.pt)")
        from sam2.sam2_image_predictor import SAM2ImagePredictor
        self.checkpoint = str(checkpoint)
        self.fm = FeatureMatching(**fm_options)
        self.model = build_sam2(config, checkpoint, kind="image")
        self.predictor = SAM2ImagePredictor(self.model)
        fit_feature_sizes(self.predictor)
        self.max_regions, self.box_margin, self.negative_point = int(max_regions), float(box_margin), negative_point
        self.device = torch.device("cpu")

    def to(self, device) -> "FmPrompt":
        self.device = torch.device(device)
        self.model.to(self.device)
        for k, v in vars(self.fm).items():
            if isinstance(v, torch.Tensor):
                setattr(self.fm, k, v.to(self.device))
        return self

    def fit(self, supports: list[Support]) -> None:
        self.fm.fit(supports)

    def prompts(self, margin: np.ndarray, size: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """[(box x0 y0 x1 y1, points N x 2 (x, y), labels N)] in query pixels, largest region first."""
        h, w = size
        gh, gw = margin.shape
        sy, sx = h / gh, w / gw
        lab, n = ndimage.label(margin > 0, structure=np.ones((3, 3), bool))
        if n == 0:
            return []
        areas = np.bincount(lab.ravel())[1:]
        out = []
        neg = np.unravel_index(int(margin.argmin()), margin.shape)
        for r in np.argsort(-areas)[: self.max_regions]:
            ys, xs = np.nonzero(lab == r + 1)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            # grow the box by box_margin of its size on each side
            my, mx = self.box_margin * (y1 - y0), self.box_margin * (x1 - x0)
            box = np.array([max(0, (x0 - mx) * sx), max(0, (y0 - my) * sy),
                            min(w, (x1 + mx) * sx), min(h, (y1 + my) * sy)], np.float32)
            i = int(np.argmax(margin[ys, xs]))
            pts = [((xs[i] + 0.5) * sx, (ys[i] + 0.5) * sy)]
            labels = [1]
            if self.negative_point and margin[neg] < 0:
                pts.append(((neg[1] + 0.5) * sx, (neg[0] + 0.5) * sy))
                labels.append(0)
            out.append((box, np.array(pts, np.float32), np.array(labels, np.int32)))
        return out

    def score(self, query: Query) -> torch.Tensor:
        from ..sam.build import autocast
        margin = self.fm.score(query).float().cpu()
        h, w = query.image.shape[:2]
        prompts = self.prompts(margin.numpy(), (h, w))
        if not prompts:
            return margin
        with torch.inference_mode(), autocast(self.device):
            self.predictor.set_image(query.image)
            best = None
            for box, pts, labels in prompts:
                logits, _, _ = self.predictor.predict(point_coords=pts, point_labels=labels, box=box,
                                                      multimask_output=False, return_logits=True)
                lg = torch.as_tensor(np.asarray(logits[0], np.float32))
                best = lg if best is None else torch.maximum(best, lg)
        return best

    def describe(self) -> dict:
        return {"method": self.name, "checkpoint": self.checkpoint, **{k: v for k, v in self.fm.describe().items()
                                                                       if k != "method"}}
