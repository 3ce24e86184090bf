"""Segment-anything plumbing shared by the SAM methods and proposers (needs ``fdseg[sam]``)."""
from .build import autocast, build_sam2, require_sam2, resolve_config, save_random_sam2

__all__ = ["autocast", "build_sam2", "require_sam2", "resolve_config", "save_random_sam2"]
