"""fdseg: few-shot industrial defect segmentation.

    import fdseg
    seg = fdseg.FewShotSegmenter(backbone="efficientnet_lite0", method="fm")
    seg.fit(support_images, support_masks)
    pred = seg.predict(query_image)      # pred.mask, pred.score, pred.boxes
"""
import os

# oneDNN keeps a compiled kernel per matmul / convolution shape (1024 by default). One backbone pass at one
# input size uses 48 of them (33 convolutions and their weights' reorders, bf16): with fewer, every pass
# recompiles them all (a 256 x 256 pass 17 -> 10 ms at 64 shapes, BENCHMARKS.md). A long run with many
# shapes (the pruned matching's row counts, zoomed inputs) grows by ~1-2 MB per shape held, so the cap
# is one pass plus the matching's shapes, not the default. Read by oneDNN when it first runs, so it
# holds even where torch was imported before fdseg; a value set by the user wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

from .backbones import create_backbone, list_backbones, register_backbone
from .errors import FdsegError, InputError, MissingExtraError
from .methods import create_method, list_methods, register_method
from .refine import create_proposer, list_proposers, refine, register_proposer
from .segmenter import FewShotSegmenter, Prediction
from .inspector import load

__version__ = "0.1.0"

__all__ = ["FdsegError", "FewShotSegmenter", "InputError", "MissingExtraError", "Prediction",
           "__version__", "create_backbone", "create_method", "list_backbones", "list_methods", "load",
           "register_backbone", "register_method", "create_proposer", "list_proposers", "refine",
           "register_proposer"]
