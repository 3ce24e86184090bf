"""docs/backbones.md's "your own backbone" example runs as written and segments with fdseg."""
import re

import numpy as np
import torch

from fdseg import list_backbones
from fdseg.cli import main

from conftest import REPO, planted


def _readme_example() -> str:
    text = (REPO / "docs" / "backbones.md").read_text()
    section = text.split("Your own backbone", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_backbone_example_registers_and_segments(tmp_path, capsys):
    ns: dict = {}
    exec(compile(_readme_example(), "docs/backbones.md", "exec"), ns)
    assert "tiny_net" in list_backbones()
    seg = ns["seg"]
    assert seg.extractor.backbone.strides == (8,) and seg.extractor.channels == 32
    torch.manual_seed(0)
    sup, sm = planted(128, 128, (32, 32, 96, 96), seed=1)
    q, qm = planted(128, 128, (16, 48, 80, 112), seed=2)
    pred = seg.fit([sup], [sm]).predict(q)
    assert pred.mask.shape == qm.shape
    # even an untrained 8x8 patch embedding separates the striped patch from the grain
    inter = np.logical_and(pred.mask, qm).sum() / np.logical_or(pred.mask, qm).sum()
    assert inter > 0.5
    # its weights argument works as the example says, and the CLI lists it
    w = tmp_path / "tiny.pth"
    torch.save(seg.extractor.backbone.state_dict(), w)
    again = ns["tiny_net"](weights=w)
    assert torch.equal(again.body[0].weight, seg.extractor.backbone.body[0].weight)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "tiny_net" in out and "dinov2_vitb14" in out and "[needs fdseg[timm]]" in out
