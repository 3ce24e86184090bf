"""Named presets: the settings objects behind ``--preset paper|fast|accurate``.

Each preset fixes the pipeline's settings that trade accuracy for speed; any setting given explicitly
(``FewShotSegmenter(preset="fast", zoom=2)``, ``--preset fast --zoom 2``) overrides the preset's.
``accurate`` is the default. What each costs and scores: BENCHMARKS.md (headline table).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from .errors import InputError

# the settings a preset decides, with the default (= accurate) values
DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(
    resize="auto", zoom="auto", support_augment="auto", query_augment="auto",
    colour_refine=0.3, colour_options=None, method_options=None, threshold=0.0))

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    # today's default: every accuracy rule on (8 support views for one support, the query's flips, zoom
    # for small defects on large images, fm's linear head, the support colour rule)
    "accurate": MappingProxyType({}),
    # the paper's rule (GFDS MatchingNet): images squeezed to 256 x 256, the supports' cells as they are,
    # max-cosine argmax, no head, no refinement
    "paper": MappingProxyType(dict(resize="resize", zoom=1, support_augment="none", query_augment="none",
                                   colour_refine=0.0, method_options={"head": 0.0})),
    # the cheap rules of the default, none of the multi-view ones: aspect-kept resize, no zoom, one view
    # of each support and of the query, head and colour rule on (its tau fixed: chosen on the supports
    # without the zoom it costs bsdata's small pits 2.2 points at 5-shot, BENCHMARKS.md; and its
    # single-support slack without the ring check: in `fast` the check gains nothing, 30.46 -> 30.42,
    # and costs magnetic_tile 0.7, docs/experiments.md)
    "fast": MappingProxyType(dict(zoom=1, support_augment="none", query_augment="none",
                                  colour_options={"tune_from": 0, "min_trimmed": 0})),
    # the accurate path's settings behind a first pass with the `fast` rules on the same backbone: a query
    # the first pass proves OK by the fit's bound is answered by it, every other one by the accurate path
    # (FewShotSegmenter(preset="line") builds a fdseg.cascade.CascadeSegmenter; docs/cascade.md)
    "line": MappingProxyType({}),
})


def list_presets() -> list[str]:
    return list(PRESETS)


def preset_settings(name: str | None) -> dict[str, Any]:
    """The full settings of preset ``name`` (None = the default, ``accurate``)."""
    name = name or "accurate"
    if name not in PRESETS:
        raise InputError("preset", f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return {**DEFAULTS, **PRESETS[name]}


def resolve(name: str | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """Preset ``name``'s settings with the explicitly ``given`` ones (not None) on top."""
    out = preset_settings(name)
    out.update({k: v for k, v in given.items() if v is not None})
    return out
