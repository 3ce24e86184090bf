"""Post steps, from margins to mask: the threshold, the proposer refinement and the support colour rule.

Fitting them gives :class:`Post`: the threshold in use and the fitted rules, applied to each query by
:func:`fdseg.pipeline.finish.finish`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from .plan import Decision


@dataclass(frozen=True)
class ColourStep:
    """The support colour rule (:mod:`fdseg.refine.colour`): ``tau`` (0 = off) and its other settings."""

    tau: float = 0.3
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        from ..refine.colour import ColourModel
        known = {f.name for f in dataclasses.fields(ColourModel) if f.init and f.name not in ("tau", "table")}
        bad = sorted(set(dict(self.options)) - known)
        if bad:
            raise InputError("colour_options", f"unknown {', '.join(bad)}; known: {', '.join(sorted(known))}")
        if self.tau:
            self.model()       # validates the settings now, not at the first fit

    def model(self):
        from ..refine.colour import ColourModel
        return ColourModel(tau=float(self.tau), **dict(self.options))

    def config(self) -> dict:
        return {"colour": self.model().describe() if self.tau else None}

    def fit(self, images: list[np.ndarray], masks: list[np.ndarray]):
        """-> (fitted ColourModel or None, Decision)."""
        if not self.tau:
            return None, Decision("colour", "off", "colour_refine=0")
        m = self.model().fit(images, masks)
        if m.active:
            return m, Decision("colour", f"{m.mode}, on", f"keeps {m.kept:.2f} >= {m.min_kept:g} of the supports' "
                                                          f"defect pixels at tau {m.tau:g}")
        if m.table is None and m.kept == 0.0:
            return m, Decision("colour", "off", "no colour statistics (grey supports with grey=off, or no defect "
                                                "pixel left in the frame)")
        return m, Decision("colour", f"{m.mode}, off", f"keeps {m.kept:.2f} < {m.min_kept:g} of the supports' "
                                                       f"defect pixels: not a model of the defect")


@dataclass(frozen=True)
class ThresholdStep:
    """The margin above which a pixel is proposed as defect: ``threshold``, lowered by the colour rule's
    slack when a single support was fitted and the rule is in effect (it trims what the looser matching
    adds; with one support the matching misses most, with five it does not)."""

    threshold: float = 0.0

    def config(self) -> dict:
        return {"threshold": self.threshold}

    def fit(self, n_supports: int, colour) -> Decision:
        on = colour is not None and colour.active
        if on and n_supports == 1 and colour.slack:
            return Decision("threshold", self.threshold - colour.slack,
                            f"{self.threshold:g} - slack {colour.slack:g}: one support and the colour rule on")
        why = "the colour rule off" if not on else (f"{n_supports} supports: no slack" if n_supports > 1
                                                     else "slack 0")
        return Decision("threshold", self.threshold, f"{self.threshold:g}: {why}")


@dataclass
class Post:
    """The fitted post steps of one fit: threshold, then the proposer refinement, then the colour rule."""

    threshold: float
    refiner: Any = None                  # fdseg.refine.Refiner (shared, stateless) or None
    colour: Any = None                   # fitted ColourModel or None
    steps: list[str] = field(default_factory=list)

    @property
    def refines(self) -> bool:
        return self.refiner is not None or self.colour is not None

    def refine(self, rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.refiner is not None:
            mask = self.refiner(rgb, mask)
        if self.colour is not None:
            mask = self.colour(rgb, mask)
        return mask
