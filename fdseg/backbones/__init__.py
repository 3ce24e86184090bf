"""Frozen feature extractors, one module each, found through a registry."""
from .base import Backbone, load_into, load_state_dict_file
from .registry import backbone_entry, create_backbone, list_backbones, register_backbone

__all__ = ["Backbone", "backbone_entry", "create_backbone", "list_backbones", "load_into",
           "load_state_dict_file", "register_backbone"]
