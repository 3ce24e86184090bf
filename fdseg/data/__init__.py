"""Data: image/mask reading, dataset layouts, episodes, preprocessing."""
from .episodes import Episode, load_episodes, make_episodes, save_episodes
from .images import load_image, load_mask
from .layouts import Catalog, Sample, scan, validate
from .preprocess import Preprocess

__all__ = ["Catalog", "Episode", "Preprocess", "Sample", "load_episodes", "load_image", "load_mask",
           "make_episodes", "save_episodes", "scan", "validate"]
