"""``sam2_track``: SAM2's video predictor with the supports as conditioning frames.

The K supports are frames 0..K-1, each conditioned with its mask (``add_new_mask``); the
query is frame K and is tracked from the supports' memory. Frames go to the predictor from
memory (resized and normalised like sam2's own frame loader, no JPEG round trip). SAM2's
object score decides "absent": its mask logits are then very negative, so a defect-free
query gets an empty mask. The margin returned is SAM2's mask logit (> 0 = defect).

``reuse_memory=True`` (default): the supports are encoded (image encoder + memory encoder)
once in ``fit``; each query only replaces frame K and is tracked from that memory (the
result equals a fresh video state, see tests). ``False`` rebuilds the whole video per query
(K + 1 image encodings per query).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Method, Query, Support
from .registry import register_method
from ..errors import InputError

IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)


def frames_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 images -> N x 3 x size x size float, normalised as sam2's frame loader does."""
    out = []
    for im in images:
        t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() / 255.0
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(t[0])
    x = torch.stack(out)
    mean = torch.tensor(IMG_MEAN)[:, None, None]
    std = torch.tensor(IMG_STD)[:, None, None]
    return (x - mean) / std


@register_method("sam2_track", summary="SAM2 video predictor: supports = conditioning frames, query = last frame",
                 extra="sam")
class Sam2Track(Method):
    uses_features = False
    needs_image = True
    temperature = 1.0          # margins are SAM2 mask logits

    def __init__(self, checkpoint: str | None = None, config: str | None = None, reuse_memory: bool = True,
                 obj_id: int = 1):
        from ..sam.build import build_sam2, require_sam2
        require_sam2("the sam2_track method")
        if checkpoint is None:
            raise InputError("--sam2-checkpoint", "sam2_track needs a SAM2 checkpoint (e.g. sam2.1_hiera_tiny.pt)")
        self.checkpoint, self.config = str(checkpoint), config
        self.predictor = build_sam2(config, checkpoint, kind="video")
        self.reuse_memory, self.obj_id = bool(reuse_memory), obj_id
        self.device = torch.device("cpu")
        self.state: dict | None = None
        self.support_frames: torch.Tensor | None = None
        self.support_masks: list[np.ndarray] = []

    def to(self, device) -> "Sam2Track":
        self.device = torch.device(device)
        self.predictor.to(self.device)
        self.state = None
        if self.support_masks:
            self._encode_supports()
        return self

    # -- state -------------------------------------------------------------------------------
    def _init_state(self, frames: torch.Tensor) -> dict:
        """sam2's init_state with our in-memory frames in place of its JPEG / MP4 loader.

        The frames are already at the model's size; outputs come back at that size (the
        segmenter resizes the margin to the query)."""
        import sam2.sam2_video_predictor as vp
        size = self.predictor.image_size
        frames = frames.to(self.device)
        orig = vp.load_video_frames
        vp.load_video_frames = lambda *a, **k: (frames, size, size)
        try:
            return self.predictor.init_state(video_path="<in-memory frames>")
        finally:
            vp.load_video_frames = orig

    def _propagate(self, state: dict, start: int):
        """propagate_in_video without its per-call progress bar (one bar per query is noise here)."""
        import sam2.sam2_video_predictor as vp
        orig = vp.tqdm
        vp.tqdm = lambda it, *a, **k: it
        try:
            yield from self.predictor.propagate_in_video(state, start_frame_idx=start)
        finally:
            vp.tqdm = orig

    def _condition(self, state: dict) -> None:
        for i, m in enumerate(self.support_masks):
            self.predictor.add_new_mask(state, frame_idx=i, obj_id=self.obj_id, mask=torch.from_numpy(m))

    def _encode_supports(self) -> None:
        """Frames 0..K-1 conditioned and encoded once; frame K is a placeholder for the queries."""
        from ..sam.build import autocast
        k = len(self.support_masks)
        frames = torch.cat([self.support_frames, torch.zeros_like(self.support_frames[:1])])
        with torch.inference_mode(), autocast(self.device):
            self.state = self._init_state(frames)
            self._condition(self.state)
            self.predictor.propagate_in_video_preflight(self.state)
        self._k = k

    def fit(self, supports: list[Support]) -> None:
        masks = [np.asarray(s.mask, bool) for s in supports if s.image is not None]
        if not masks or not any(m.any() for m in masks):
            raise InputError("supports", "sam2_track needs at least one support mask with defect pixels")
        keep = [s for s in supports if s.image is not None and s.mask.any()]
        self.support_masks = [np.asarray(s.mask, bool) for s in keep]
        self.support_frames = frames_tensor([s.image for s in keep], self.predictor.image_size)
        self.state = None
        if self.reuse_memory:
            self._encode_supports()

    # -- query -------------------------------------------------------------------------------
    def _forget_query(self, state: dict, k: int) -> None:
        """Drop everything frame k left in the state (its outputs, cached features, tracked marks)."""
        state["cached_features"].pop(k, None)
        for d in [state.get("output_dict")] + list(state.get("output_dict_per_obj", {}).values()):
            if d:
                d["non_cond_frame_outputs"].pop(k, None)
        for d in state.get("temp_output_dict_per_obj", {}).values():
            d["non_cond_frame_outputs"].pop(k, None)
        tracked = state.get("frames_tracked_per_obj")
        if tracked is not None:
            for v in tracked.values():
                v.pop(k, None)
        old = state.get("frames_already_tracked")
        if old is not None:
            old.pop(k, None)

    def score(self, query: Query) -> torch.Tensor:
        from ..sam.build import autocast
        if not self.support_masks:
            raise RuntimeError("fit() the method before scoring")
        frame = frames_tensor([query.image], self.predictor.image_size).to(self.device)
        k = len(self.support_masks)
        with torch.inference_mode(), autocast(self.device):
            if self.reuse_memory:
                if self.state is None:
                    self._encode_supports()
                state = self.state
                self._forget_query(state, k)
                state["images"][k] = frame[0].to(state["images"].dtype)
                start = k
            else:
                state = self._init_state(torch.cat([self.support_frames.to(self.device), frame]))
                self._condition(state)
                start = 0
            logits = None
            for idx, obj_ids, masks in self._propagate(state, start):
                if idx == k:
                    logits = masks[list(obj_ids).index(self.obj_id)][0]
        if logits is None:   # pragma: no cover - sam2 always yields the last frame
            raise RuntimeError("sam2 returned no output for the query frame")
        return logits.float()

    def describe(self) -> dict:
        return {"method": self.name, "checkpoint": self.checkpoint, "image_size": int(self.predictor.image_size),
                "supports": len(self.support_masks), "reuse_memory": self.reuse_memory}
