"""``onnx``: run a backbone exported by ``fdseg export --format onnx`` with onnxruntime.

    fdseg segment --backbone onnx --weights lite0.onnx ...

Strides, channels and input normalisation come from the file's metadata.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .base import Backbone
from .registry import register_backbone
from ..errors import InputError, MissingExtraError


class OnnxBackbone(Backbone):
    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingExtraError("the onnx backbone", "onnx", "onnxruntime") from None
        if not path.is_file():
            raise InputError(path, "ONNX model file does not exist")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads() or os.cpu_count() or 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise InputError(path, f"not a loadable ONNX model ({str(e).splitlines()[0]})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get("fdseg")
        if raw is None:
            raise InputError(path, "ONNX model has no fdseg metadata: export it with `fdseg export --format onnx`")
        meta = json.loads(raw)
        self.name = f"onnx:{meta['fdseg_backbone']}"
        self.strides, self.channels = tuple(meta["strides"]), tuple(meta["channels"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.multiple = int(meta.get("multiple", 32))
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise InputError(self.name, f"input {w}x{h} is not a multiple of {self.multiple}")
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)})
        return [torch.from_numpy(o).to(x.device) for o in outs]


@register_backbone("onnx", summary="any exported backbone run by onnxruntime (--weights model.onnx)",
                   extra="onnx", needs_weights=True)
def onnx_backbone(weights: str | Path | None = None, threads: int | None = None, **_) -> OnnxBackbone:
    if weights is None:
        raise InputError("--weights", "the onnx backbone needs --weights path/to/model.onnx "
                                      "(made by `fdseg export --format onnx`)")
    return OnnxBackbone(Path(weights), threads)
