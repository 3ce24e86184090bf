"""Method registry (name -> class); a new method is one module in fdseg/methods/."""
from __future__ import annotations

from ..registry import Entry, Registry

METHODS = Registry("method", "fdseg.methods", "fdseg.methods")


def register_method(name: str, *, summary: str = "", extra: str | None = None, **info):
    """Class decorator: ``@register_method("fm")`` on a :class:`~fdseg.methods.Method`.
    ``info`` is shown by ``fdseg list`` and the web app (e.g. ``needs_checkpoint=True``)."""
    reg = METHODS.register(name, summary=summary, extra=extra, **info)

    def deco(cls):
        cls.name = name
        return reg(cls)
    return deco


def list_methods() -> list[str]:
    return METHODS.names()


def method_entry(name: str) -> Entry:
    return METHODS.entry(name)


def create_method(name: str, **kwargs):
    return METHODS.create(name, **kwargs)
