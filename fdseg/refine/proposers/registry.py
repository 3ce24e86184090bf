"""Region proposer registry (name -> factory); a new proposer is one module in this package.

A proposer turns an RGB image (H x W x 3 uint8) into candidate masks for
:func:`fdseg.refine.refine`: an ``N x H x W`` bool stack or an ``H x W`` int label map
(0 = no candidate). Returning no candidates is valid (the prediction stays as it is).
"""
from __future__ import annotations

import numpy as np

from ... import registry as _registry

Entry = _registry.Entry
# (the Registry class is not imported by name: the serve app finds this module's registry by duck typing)
PROPOSERS = _registry.Registry("refine", "fdseg.refine.proposers", "fdseg.proposers", skip=("common",))


class Proposer:
    """Base class; subclasses are registered with :func:`register_proposer`."""

    name: str = "proposer"
    #: True: the refiner resizes the image to the mask's size before proposing
    at_mask_resolution: bool = False

    def propose(self, image: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {"refine": self.name}


def register_proposer(name: str, *, summary: str = "", extra: str | None = None, **info):
    """Class decorator: ``@register_proposer("superpixel")`` on a :class:`Proposer`."""
    reg = PROPOSERS.register(name, summary=summary, extra=extra, **info)

    def deco(cls):
        cls.name = name
        return reg(cls)
    return deco


def list_proposers() -> list[str]:
    return PROPOSERS.names()


def proposer_entry(name: str) -> Entry:
    return PROPOSERS.entry(name)


def create_proposer(name: str, **kwargs) -> Proposer:
    return PROPOSERS.create(name, **kwargs)
