"""Reading torch checkpoint files safely: ``weights_only=True`` (a checkpoint never runs code),
and every failure an :class:`~fdseg.errors.InputError` that names the file."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError


def read_torch_file(path: str | Path, *, missing: str, unreadable: str) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU. ``missing`` / ``unreadable`` are the
    messages for a file that does not exist / cannot be unpickled as plain tensors and containers."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, missing)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError, zipfile errors ...
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise InputError(path, f"{unreadable} ({type(e).__name__}{': ' + msg if msg else ''})") from None
