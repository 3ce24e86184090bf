"""Few-shot episodes with the paper's protocol, exportable as JSON.

Protocol (GFDS): for each dataset and shot count K, one ``random.Random(seed)``
(seed 2 in the paper) is consumed in order: classes sorted by name, and within
a class every image (sorted by file name) is the query exactly once, with K
supports drawn by ``rng.sample`` from the sorted list of the class's *other*
images. Defect-free images of a dataset (MVTec ``good``, VisA normal) are extra
queries, one per image, with supports drawn from a class in turn; they only feed
the false-positive rate.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .layouts import Catalog
from ..errors import InputError


@dataclass(frozen=True)
class Episode:
    dataset: str
    cls: str
    shots: int
    query: str                    # image path, relative to the catalog root
    query_mask: str | None        # None for a defect-free query
    supports: tuple[str, ...]
    support_masks: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.cls}/{self.shots}/{Path(self.query).name}"

    @property
    def defect_free(self) -> bool:
        return self.query_mask is None


def _rel(p: Path, root: Path) -> str:
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p.resolve())


def make_episodes(cat: Catalog, shots: int, seed: int = 2) -> list[Episode]:
    """Episodes of every dataset in ``cat`` for K = ``shots``."""
    if shots < 1:
        raise InputError(None, f"shots must be >= 1, got {shots}")
    out: list[Episode] = []
    root = cat.root
    for ds in sorted(cat.classes):
        rng = random.Random(seed)
        for cls in sorted(cat.classes[ds]):
            samples = sorted(cat.classes[ds][cls], key=lambda s: s.image.name)
            if len(samples) <= shots:
                raise InputError(root / ds / cls, f"class has {len(samples)} images: {shots}-shot episodes "
                                                 f"need at least {shots + 1}")
            for i, q in enumerate(samples):
                others = samples[:i] + samples[i + 1:]
                sup = rng.sample(others, shots)
                out.append(Episode(ds, cls, shots, _rel(q.image, root), _rel(q.mask, root),
                                   tuple(_rel(s.image, root) for s in sup),
                                   tuple(_rel(s.mask, root) for s in sup)))
        classes = sorted(cat.classes[ds])
        for j, g in enumerate(sorted(cat.good.get(ds, []), key=lambda s: s.image.name)):
            cls = classes[j % len(classes)]
            sup = rng.sample(sorted(cat.classes[ds][cls], key=lambda s: s.image.name), shots)
            out.append(Episode(ds, cls, shots, _rel(g.image, root), None,
                               tuple(_rel(s.image, root) for s in sup),
                               tuple(_rel(s.mask, root) for s in sup)))
    return out


def save_episodes(path: str | Path, episodes: list[Episode], root: str | Path, seed: int | None = None) -> None:
    from ..atomic import write_text
    data = {"root": str(Path(root).resolve()), "seed": seed,
            "episodes": [asdict(e) for e in episodes]}
    write_text(path, json.dumps(data, indent=1))


def load_episodes(path: str | Path) -> tuple[list[Episode], Path]:
    """Episodes and the root their paths are relative to."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        eps = [Episode(e["dataset"], e["cls"], int(e["shots"]), e["query"], e.get("query_mask"),
                       tuple(e["supports"]), tuple(e["support_masks"])) for e in data["episodes"]]
    except FileNotFoundError:
        raise InputError(path, "episode file does not exist") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(path, f"not an fdseg episode file ({e})") from None
    return eps, Path(data.get("root", path.parent))
