"""The segmentation pipeline as named steps, each fitted on the supports and applied per query:

    preprocess (resize, zoom) -> support views -> query views -> matcher (+ head) -> post steps
    (threshold, proposer refinement, colour rule) -> finish (mask, score, boxes)

Fitting resolves every step into a frozen, printable :class:`Plan` (``FewShotSegmenter.plan``).
"""
from .finish import Prediction, connected_boxes, finish
from .plan import Decision, Plan
from .post import ColourStep, Post, ThresholdStep
from .views import AUGMENTATIONS, QUERY_VIEWS, QueryViews, SupportViews, merge_views, view_images
from .zoom import ZOOM_BELOW_CELLS, ZoomStep, choose_zoom

__all__ = ["AUGMENTATIONS", "ColourStep", "Decision", "Plan", "Post", "Prediction", "QUERY_VIEWS", "QueryViews",
           "SupportViews", "ThresholdStep", "ZOOM_BELOW_CELLS", "ZoomStep", "choose_zoom", "connected_boxes",
           "finish", "merge_views", "view_images"]
