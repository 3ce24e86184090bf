"""``fdseg bench`` with each query's views scored by fm's pruned ``score_views`` (mask-exact), for as long
as the segmenter does not call it itself: same arguments as ``fdseg bench``.

    .venv/bin/python benchmarks/bench_pruned.py --data ../shared/data/defects --shots 1 --method fm \\
        --datasets crackforest magnetic_tile sd_saliency_900 --max-per-class 6 --threads 1 --out bench-pruned

Per episode the bench's records (tp / fp / fn / tn) can be compared with a run without it: the
masks are meant to be identical (BENCHMARKS.md, matching speed).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from presets_speed import _pruned_score, pipeline_prunes  # noqa: E402

from fdseg import FewShotSegmenter  # noqa: E402
from fdseg.cli import main  # noqa: E402

if __name__ == "__main__":
    if not pipeline_prunes():
        plain = FewShotSegmenter._score

        def _score(self, item):
            if hasattr(self.state.method, "score_views"):
                return _pruned_score(self, item)
            return plain(self, item)
        FewShotSegmenter._score = _score
    sys.exit(main(["bench", *sys.argv[1:]]))
