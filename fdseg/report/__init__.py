"""Overlays, panels and HTML reports."""
from .overlay import heatmap, overlay, panel

__all__ = ["heatmap", "overlay", "panel"]
