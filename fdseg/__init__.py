"""fdseg: few-shot industrial defect segmentation.

    import fdseg
    seg = fdseg.FewShotSegmenter(backbone="efficientnet_lite0", method="fm")
    seg.fit(support_images, support_masks)
    pred = seg.predict(query_image)      # pred.mask, pred.score, pred.boxes
"""
import os

# oneDNN keeps a compiled kernel per matmul / convolution shape (1024 by default). The pruned matching
# multiplies a different number of rows for every query, so a long run filled that cache by ~4 MB per
# query (a 5-shot bench: +1 GB per 300 episodes). 64 shapes still held ~330 MB on zoomed images (each
# backbone layer at each input size is a shape); 4 measured as fast as 64 or 1024 (creating a kernel is
# cheap next to running it: BENCHMARKS.md, memory). Read by oneDNN when it first runs, so it holds even
# where torch was imported before fdseg; a value set by the user wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4")

from .backbones import create_backbone, list_backbones, register_backbone
from .errors import FdsegError, InputError, MissingExtraError
from .methods import create_method, list_methods, register_method
from .refine import create_proposer, list_proposers, refine, register_proposer
from .segmenter import FewShotSegmenter, Prediction

__version__ = "0.1.0"

__all__ = ["FdsegError", "FewShotSegmenter", "InputError", "MissingExtraError", "Prediction",
           "__version__", "create_backbone", "create_method", "list_backbones", "list_methods",
           "register_backbone", "register_method", "create_proposer", "list_proposers", "refine",
           "register_proposer"]
