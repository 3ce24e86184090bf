"""The fitted plan: what each pipeline step decided on the supports, and why.

A :class:`Plan` is frozen and printable; it is what ``FewShotSegmenter.describe()`` returns under
``"plan"``, what ``fdseg segment --explain`` prints, what bench episode records store and what reports show:

    zoom=2 because support defects 1.3 cells < 2 and long side 1500 >= 1024
    support views=dihedral because one support: its 8 rotated / flipped views
    ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.preprocess import Preprocess


@dataclass(frozen=True)
class Decision:
    """One step's resolved setting and the reason for it."""

    step: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.step}={_fmt(self.value)} because {self.reason}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:+.3g}" if v else "0"
    return str(v)


@dataclass(frozen=True)
class Plan:
    """What a fit resolved: the preprocessing in use and one :class:`Decision` per step, in order."""

    supports: int
    preprocess: Preprocess
    decisions: tuple[Decision, ...]

    def __getitem__(self, step: str) -> Any:
        for d in self.decisions:
            if d.step == step:
                return d.value
        raise KeyError(step)

    def get(self, step: str, default: Any = None) -> Any:
        try:
            return self[step]
        except KeyError:
            return default

    @property
    def threshold(self) -> float:
        return float(self.get("threshold", 0.0))

    def as_dict(self) -> dict:
        return {"supports": self.supports, **{d.step: d.value for d in self.decisions},
                "reasons": {d.step: d.reason for d in self.decisions}}

    def summary(self) -> str:
        """One line: ``zoom=2; support views=dihedral; ...`` (values only)."""
        return "; ".join(f"{d.step}={_fmt(d.value)}" for d in self.decisions)

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.decisions)
