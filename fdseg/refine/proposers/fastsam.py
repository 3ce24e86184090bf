"""``fastsam``: FastSAM ("everything" mode) from the ``ultralytics`` package; needs a checkpoint.

ultralytics checkpoints are pickled modules. The file's pickle is first read without running it
and a file that references no ultralytics class (a SAM2 or plain state-dict checkpoint, say) is
refused with a clear message; ultralytics then loads it with ``torch.load(weights_only=True)``
against its allow-list of model classes (its opt-in safe loader, switched on for this load).
``YOLO_OFFLINE=1`` is set (unless set already) so ultralytics makes no network checks.
"""
from __future__ import annotations

import contextlib
import os
import pickletools
import zipfile
from pathlib import Path

import numpy as np
import torch

from .common import grow_masks, need
from .registry import Proposer, register_proposer
from ...errors import InputError


def pickle_globals(path: Path) -> set[str]:
    """Module names a torch zip checkpoint's pickle refers to (read, never executed)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                raise InputError(path, "not a torch checkpoint (no data.pkl inside)")
            data = z.read(name)
    except zipfile.BadZipFile:
        raise InputError(path, "not a torch checkpoint (not a zip archive)") from None
    mods, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
            mods.add(arg.split(" ")[0])
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE") and isinstance(arg, str):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            mods.add(strings[-2])
    return mods


@contextlib.contextmanager
def _safe_load():
    """ultralytics' weights_only=True loader for the loads made inside (where this version has it)."""
    import ultralytics.nn.tasks as tasks
    if not getattr(getattr(tasks, "_SafeLoad", None), "SUPPORTED", False) or not hasattr(tasks, "SAFE_LOAD"):
        yield
        return
    old, tasks.SAFE_LOAD = tasks.SAFE_LOAD, True
    try:
        yield
    finally:
        tasks.SAFE_LOAD = old


@register_proposer("fastsam", summary="FastSAM everything-mode masks (ultralytics; needs FastSAM-s.pt / -x.pt)",
                   extra="sam", needs_weights=True)
class FastSAMProposer(Proposer):
    def __init__(self, checkpoint: str | None = None, conf: float = 0.1, iou: float = 0.5, imgsz: int = 1024,
                 device: str = "cpu", max_det: int = 300):
        if checkpoint is None:
            raise InputError("--fastsam-checkpoint", "the fastsam proposer needs a FastSAM checkpoint "
                                                     "(FastSAM-s.pt or FastSAM-x.pt)")
        ck = Path(checkpoint)
        if not ck.is_file():
            raise InputError(ck, "FastSAM checkpoint not found")
        mods = pickle_globals(ck)
        if not any(m.startswith("ultralytics") for m in mods):
            raise InputError(ck, "not a FastSAM / ultralytics checkpoint (it refers to no ultralytics model "
                                 f"class; modules: {', '.join(sorted(mods)[:5]) or 'none'})")
        os.environ.setdefault("YOLO_OFFLINE", "1")
        ul = need("ultralytics", "the fastsam proposer", "sam")
        try:
            with _safe_load():
                self.model = ul.FastSAM(str(ck))
        except Exception as e:
            raise InputError(ck, f"ultralytics could not load it as FastSAM: {type(e).__name__}: {e}") from None
        if getattr(self.model, "task", "segment") != "segment":
            raise InputError(ck, f"not a segmentation model (task {self.model.task!r})")
        self.checkpoint, self.conf, self.iou, self.imgsz = str(ck), conf, iou, imgsz
        self.device, self.max_det = device, max_det

    def propose(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        with torch.inference_mode():
            res = self.model(np.ascontiguousarray(image[..., ::-1]), device=self.device, retina_masks=True,
                             imgsz=self.imgsz, conf=self.conf, iou=self.iou, max_det=self.max_det, verbose=False)
        masks = res[0].masks if res else None
        if masks is None or masks.data is None or not len(masks.data):
            return np.zeros((0, h, w), bool)
        return grow_masks(masks.data.cpu().numpy() > 0.5, (h, w))

    def describe(self) -> dict:
        return {"refine": self.name, "checkpoint": self.checkpoint, "conf": self.conf, "iou": self.iou,
                "imgsz": self.imgsz}
