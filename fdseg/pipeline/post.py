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
    ok_level: float | None = None        # the OK gate's level (:class:`OkGate`; None: no gate)
    ok_components: bool = False          # True: remove the mask components whose peak is not above the
    #                                      level; False: empty the mask of a query whose defect score is not
    #                                      above it (``ok_gate="median"``)
    ok_soft: bool = False                # with ok_components: keep the pixels whose margin plus their
    #                                      component's peak exceeds the level (a weak component's core)

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
OK_GATE_MIN_HELD = {"auto": 5, "median": 1}   # fewer held out: no gate (the normals all go to the fit)
OK_GATE_QUANTILE = 0.25  # auto: the lower quartile of the held-out images' defect scores (Harrell-Davis)


def harrell_davis(x, q: float) -> float:
    """The Harrell-Davis estimate of the ``q`` quantile of ``x``: a Beta(q (n + 1), (1 - q)(n + 1))-weighted
    mean of all the order statistics, where ``np.quantile`` interpolates two. One value moved by rounding
    moves it by its weight (at most 0.45 of the move for 5 values at the quartile), not by all of it."""
    from scipy.stats import beta
    v = np.sort(np.asarray(x, dtype=np.float64))
    n = len(v)
    if n == 1:
        return float(v[0])
    w = np.diff(beta.cdf(np.arange(n + 1) / n, q * (n + 1), (1 - q) * (n + 1)))
    return float(w @ v)


@dataclass(frozen=True)
class OkGate:
    """The OK gate, fitted on defect-free images (normals): every fifth normal (at most ``OK_GATE_MAX``)
    is held out of the matcher's fit and predicted like a query; its defect score (the largest margin
    above the threshold) says how strong a match to the defect the product's good surface shows.

    * ``auto`` (the default; with at least 25 normals, so that 5 or more are held out): the level is the
      lower quartile (Harrell-Davis) of the held-out images' defect scores: what three in four good images
      of the product show somewhere. In a query's mask a pixel stays where its margin plus its connected
      component's peak margin (both above the threshold) exceeds the level: a component stronger than
      the level keeps its whole mask, one no stronger than half of it is removed (not told apart from
      good surface), one in between keeps its core. Soft, so that a rounding difference (the bf16 and
      fp32 paths move margins by ~0.01) moves the kept pixels as little (docs/precision.md); against the
      earlier all-or-nothing removal at the plain quartile the same mIoU (no dataset -0.08 or worse),
      ~25 % more false-alarm pixels on good magnetic tiles (still ~25 % fewer than the normals in the
      head alone), and the defect pixels kept on the two paths 1.2 % apart instead of 17 % on the
      real-tile test (docs/normals.md).
    * ``median`` (opt-in, with at least 5 normals): a query whose defect score is not above the median
      of the held-out ones is judged OK and its whole mask emptied: fewer false alarms still, but some
      real defects emptied (magnetic_tile -0.6 mIoU at 5-shot, over the 0.5 a rule may lose).
    * ``off``: every normal goes to the fit; no gate.

    The levels follow from the user's own good images (no constant scanned on a dataset's margins)."""

    mode: str = "auto"

    def __post_init__(self):
        if self.mode not in ("auto", "median", "off"):
            raise InputError("ok_gate", f"choose auto, median or off, got {self.mode!r}")

    @property
    def per_component(self) -> bool:
        """True: the gate removes weak mask components; False: it empties the mask of a weak query."""
        return self.mode == "auto"

    @property
    def soft(self) -> bool:
        """True: a weak component keeps its core (the pixels whose margin plus its peak exceeds the level)."""
        return self.mode == "auto"

    def split(self, n: int) -> tuple[list[int], list[int]]:
        """-> (indices of the ``n`` normals the matcher fits on, of the held-out ones that calibrate the gate)."""
        held = list(range(OK_GATE_EVERY - 1, n, OK_GATE_EVERY))[:OK_GATE_MAX]
        if self.mode == "off" or len(held) < OK_GATE_MIN_HELD[self.mode]:
            return list(range(n)), []
        return sorted(set(range(n)) - set(held)), held

    def fit(self, scores: list[float], n_normals: int) -> tuple[float | None, Decision]:
        """Defect scores of the held-out normals -> (gate level or None, Decision)."""
        if self.mode == "off":
            return None, Decision("ok gate", "off", "ok_gate=off")
        if not scores:
            need = OK_GATE_EVERY * OK_GATE_MIN_HELD[self.mode]
            why = "no defect-free images" if not n_normals else \
                f"{n_normals} defect-free image(s) < {need}: too few held out to calibrate"
            return None, Decision("ok gate", "off", why)
        if self.mode == "median":
            level = float(np.median(scores))
            return level, Decision("ok gate", level, f"median defect score of the {len(scores)} defect-free image(s) "
                                                     f"held out of {n_normals}: a query not above it is judged OK")
        level = harrell_davis(scores, OK_GATE_QUANTILE)
        return level, Decision("ok gate", level, f"lower quartile (Harrell-Davis) of the defect scores of the "
                                                 f"{len(scores)} defect-free images held out of {n_normals}: a mask "
                                                 f"component no stronger than it keeps only the pixels whose margin "
                                                 f"plus its peak exceeds it (none under half of it)")
