"""Matching rules from support features to a query margin map, via a registry."""
from .base import Method, Query, Support, support_cells
from .registry import create_method, list_methods, method_entry, register_method

__all__ = ["Method", "Query", "Support", "create_method", "list_methods", "method_entry",
           "register_method", "support_cells"]
