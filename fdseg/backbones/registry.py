"""Backbone registry, as timm does for models.

Adding a backbone is adding one module to ``fdseg/backbones/`` (imported
automatically) or, from your own code::

    import torch
    from fdseg.backbones import Backbone, register_backbone

    class MyNet(Backbone):
        strides, channels = (8,), (64,)
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, stride=8, padding=1))
        def forward(self, x):
            return [self.body(x)]

    @register_backbone("my_net", summary="my frozen CNN, stride 8")
    def my_net(weights=None, **kw):
        return MyNet()

Packages can also expose builders through the ``fdseg.backbones`` entry-point group.
"""
from __future__ import annotations

from ..registry import Entry, Registry

BACKBONES = Registry("backbone", "fdseg.backbones", "fdseg.backbones")


def register_backbone(name: str, *, summary: str = "", extra: str | None = None, needs_weights: bool = False):
    """Decorator for a builder ``fn(weights=None, **kwargs) -> Backbone``."""
    return BACKBONES.register(name, summary=summary, extra=extra, needs_weights=needs_weights)


def list_backbones() -> list[str]:
    return BACKBONES.names()


def backbone_entry(name: str) -> Entry:
    return BACKBONES.entry(name)


def create_backbone(name: str, **kwargs):
    """Build a registered backbone, in eval mode with frozen parameters."""
    bb = BACKBONES.create(name, **kwargs)
    bb.eval()
    for p in bb.parameters():
        p.requires_grad_(False)
    return bb
