"""Export a backbone to ONNX, for the onnxruntime execution path (``--backbone onnx``).

The graph takes a normalised ``B x 3 x H x W`` float batch with dynamic batch, height
and width (H and W multiples of 32, which fdseg's preprocessing always gives) and
returns the backbone's feature maps. The backbone's strides, channels and input
normalisation are stored in the model's metadata, so the ONNX file alone is enough.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .backbones import create_backbone
from .errors import InputError, MissingExtraError


class _Outputs(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return tuple(self.backbone(x))


def onnx_target(out: str | Path):
    """The ``onnx`` module (a missing extra: one line saying what to install) and ``out`` as a Path
    ending in .onnx (else a one-line InputError naming it): what every ONNX export checks first."""
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("ONNX export", "onnx", "onnx") from None
    out = Path(out)
    if out.suffix != ".onnx":
        raise InputError(out, "output file must end in .onnx")
    return onnx, out


def export_onnx(backbone: str, out: str | Path, weights: str | Path | None = None,
                opset: int = 17, size: int = 256, **backbone_options) -> Path:
    onnx, out = onnx_target(out)
    bb = create_backbone(backbone, weights=weights, **backbone_options)
    names = [f"f{i}" for i in range(len(bb.strides))]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Outputs(bb).eval(), (torch.zeros(1, 3, size, size),), str(tmp),
                          input_names=["images"], output_names=names, opset_version=opset,
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        **{n: {0: "batch", 2: f"h{i}", 3: f"w{i}"} for i, n in enumerate(names)}},
                          dynamo=False)
    model = onnx.load(str(tmp))
    meta = {"fdseg_backbone": backbone, "strides": list(bb.strides), "channels": list(bb.channels),
            "mean": list(bb.mean), "std": list(bb.std), "multiple": 32}
    model.metadata_props.add(key="fdseg", value=json.dumps(meta))
    onnx.save(model, str(tmp))
    tmp.replace(out)
    return out
