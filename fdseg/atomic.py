"""Atomic file writes: write beside the target, fsync, then rename over it.

A run killed half-way leaves either the old file or the new one, never half a
PNG, CSV or JSON.
"""
from __future__ import annotations

import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import numpy as np


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kw) -> Iterator[IO]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def encode_png(array: np.ndarray) -> bytes:
    """uint8 HxW (grey) or HxWx3 (RGB) array, or a bool mask (-> 0/255), as PNG bytes."""
    from PIL import Image
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 88) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_png(path: str | Path, array: np.ndarray) -> None:
    """uint8 HxW (grey) or HxWx3 (RGB) array -> PNG, atomically."""
    write_bytes(path, encode_png(array))


def write_jpeg(path: str | Path, array: np.ndarray, quality: int = 88) -> None:
    write_bytes(path, encode_jpeg(array, quality))
