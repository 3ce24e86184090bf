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

    def fit(self, images: list[np.ndarray], masks: list[np.ndarray], grids: list[tuple[int, int]] | None = None):
        """-> (fitted ColourModel or None, Decision). ``grids``: the matching's grid on each support (from
        ``tune_from`` supports on, tau is chosen on the supports with them)."""
        if not self.tau:
            return None, Decision("colour", "off", "colour_refine=0")
        m = self.model().fit(images, masks, grids)
        chosen = ""
        if m.tuned:
            taus, ious = m.tuned
            chosen = (f" (chosen on the {len(images)} supports: their masks grown by one grid cell, trimmed "
                      f"at tau " + " / ".join(f"{t:g}" for t in taus) + ", IoU " + " / ".join(f"{v:.2f}" for v in ious)
                      + ")")
        if m.active:
            return m, Decision("colour", f"{m.mode}, on", f"keeps {m.kept:.2f} >= {m.min_kept:g} of the supports' "
                                                          f"defect pixels at tau {m.tau:g}{chosen}")
        if m.table is None and m.kept == 0.0:
            return m, Decision("colour", "off", "no colour statistics (grey supports with grey=off, or no defect "
                                                "pixel left in the frame)")
        return m, Decision("colour", f"{m.mode}, off", f"keeps {m.kept:.2f} < {m.min_kept:g} of the supports' "
                                                       f"defect pixels at tau {m.tau:g}{chosen}: not a model of "
                                                       f"the defect")


@dataclass(frozen=True)
class ThresholdStep:
    """The margin above which a pixel is proposed as defect: ``threshold``, lowered by the colour rule's
    slack when a single support was fitted and the rule is in effect (it trims what the looser matching
    adds; with one support the matching misses most, with five it does not) and trims at least half of
    the ring around the support's defect (else it could not trim what the slack adds)."""

    threshold: float = 0.0

    def config(self) -> dict:
        return {"threshold": self.threshold}

    def fit(self, n_supports: int, colour) -> Decision:
        on = colour is not None and colour.active
        if on and n_supports == 1 and colour.slack:
            if colour.loosens:
                return Decision("threshold", self.threshold - colour.slack,
                                f"{self.threshold:g} - slack {colour.slack:g}: one support and the colour rule on, "
                                f"removing {colour.trimmed:.2f} >= {colour.min_trimmed:g} of the ring around its defect")
            return Decision("threshold", self.threshold,
                            f"{self.threshold:g}: no slack, the colour rule removes {colour.trimmed:.2f} < "
                            f"{colour.min_trimmed:g} of the ring around the support's defect (it could not trim "
                            f"what a looser threshold adds)")
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
    ok_level: float | None = None        # the OK gate (:class:`OkGate`): a query whose defect score is
    #                                      not above it is judged OK and gets an empty mask (None: off)

    @property
    def refines(self) -> bool:
        return self.refiner is not None or self.colour is not None

    def refine(self, rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.refiner is not None:
            mask = self.refiner(rgb, mask)
        if self.colour is not None:
            mask = self.colour(rgb, mask)
        return mask


OK_GATE_EVERY = 5        # one normal in five is held out of the fit to calibrate the gate ...
OK_GATE_MAX = 10         # ... at most this many (each is predicted once at fit time)


@dataclass(frozen=True)
class OkGate:
    """The OK gate (opt-in: ``ok_gate="median"``), fitted on defect-free images (normals) when a fit is
    given at least ``OK_GATE_EVERY`` of them: every fifth normal (at most ``OK_GATE_MAX``) is held out of the matcher's
    fit, predicted like a query, and the median of their image-level defect scores becomes the gate: a
    query whose defect score is not above that of a typical OK image of the product is judged OK, its
    mask emptied. The rule follows from the user's own OK images (no constant scanned on data); with
    fewer normals, or ``ok_gate="off"`` (the default), there is no gate. Not the default: it cuts the
    false-alarm pixels on OK images 2.7-4.3x more, but empties some real defects at 5-shot (magnetic_tile
    -2.0 / -0.6 mIoU, over the 0.5 a rule may lose on a dataset); docs/normals.md."""

    mode: str = "off"

    def __post_init__(self):
        if self.mode not in ("median", "off"):
            raise InputError("ok_gate", f"choose median or off, got {self.mode!r}")

    def split(self, n: int) -> tuple[list[int], list[int]]:
        """-> (indices of the ``n`` normals the matcher fits on, of the held-out ones that calibrate the gate)."""
        if self.mode == "off" or n < OK_GATE_EVERY:
            return list(range(n)), []
        held = list(range(OK_GATE_EVERY - 1, n, OK_GATE_EVERY))[:OK_GATE_MAX]
        return sorted(set(range(n)) - set(held)), held

    def fit(self, scores: list[float], n_normals: int) -> tuple[float | None, Decision]:
        """Defect scores of the held-out normals -> (gate level or None, Decision)."""
        if self.mode == "off":
            return None, Decision("ok gate", "off", "ok_gate=off")
        if not scores:
            why = "no defect-free images" if not n_normals else \
                f"{n_normals} defect-free image(s) < {OK_GATE_EVERY}: none held out to calibrate"
            return None, Decision("ok gate", "off", why)
        level = float(np.median(scores))
        return level, Decision("ok gate", level, f"median defect score of the {len(scores)} defect-free image(s) held "
                                                 f"out of {n_normals}: a query not above it is judged OK")
