"""A randomly initialised FastSAM checkpoint in ultralytics' format (for tests and CPU timing only).

FastSAM-s is YOLOv8-s segmentation, FastSAM-x YOLOv8-x; ``scale`` picks n / s / m / l / x.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..refine.proposers.common import need


def save_random_fastsam(path: str | Path, scale: str = "s", seed: int = 0, imgsz: int = 1024) -> Path:
    need("ultralytics", "a FastSAM checkpoint", "sam")
    from ultralytics import __version__
    from ultralytics.nn.tasks import SegmentationModel
    torch.manual_seed(seed)
    model = SegmentationModel(f"yolov8{scale}-seg.yaml", nc=1, verbose=False)
    model.args = {"task": "segment", "imgsz": imgsz}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.half(), "train_args": {"task": "segment", "imgsz": imgsz}, "version": __version__,
                "date": None, "epoch": -1}, path)
    return path
