"""Uploaded files -> checked arrays, and masks -> PNG / RLE for JSON.

Uploads are decoded with the same rules as files on disk (``fdseg.data.images``):
each upload's bytes go to a temporary file whose name the server chooses
(``upload_3.bin``), never the client's. The client's file name is only shown in
messages and JSON, after :func:`display_name` has stripped any path from it.
"""
from __future__ import annotations

import base64
import io
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.images import load_image, load_mask
from ..errors import InputError


class UploadError(InputError):
    """Bad upload; ``status`` is the HTTP status the API answers with."""

    def __init__(self, source: str | None, problem: str, status: int = 400):
        super().__init__(source, problem)
        self.status = status


def display_name(filename: str | None, fallback: str) -> str:
    """The client's file name for messages: last path component, printable, at most 100 characters."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    if name in ("", ".", ".."):
        return fallback
    return name[:100]


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def archive_stem(name: str, taken: set[str]) -> str:
    """A file stem made only of ``[A-Za-z0-9._-]`` for ZIP members, unique within ``taken``."""
    stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    stem = _SAFE.sub("_", stem).strip("._") or "query"
    stem = stem[:80]
    out, n = stem, 1
    while out in taken:
        out = f"{stem}_{n}"
        n += 1
    taken.add(out)
    return out


class TextFields(dict):
    """A form's text fields: each field's last value (as a dict), and every value of a repeated one
    (``getall``: e.g. the field ``type``, one per support)."""

    def __init__(self) -> None:
        super().__init__()
        self._all: dict[str, list[str]] = {}

    def add(self, key: str, value: str) -> None:
        self[key] = value
        self._all.setdefault(key, []).append(value)

    def getall(self, key: str) -> list[str]:
        return list(self._all.get(key, []))


@dataclass
class Upload:
    """One uploaded file: its bytes (already size-checked) and the name to show."""

    data: bytes
    name: str          # display name (client file name without any path)
    role: str          # "support 1", "mask 2", "query 5"

    @property
    def label(self) -> str:
        return f"{self.role} ({self.name})" if self.name and self.name != self.role else self.role


def _to_temp(upload: Upload, tmpdir: Path, index: int) -> Path:
    path = tmpdir / f"upload_{index}.bin"
    path.write_bytes(upload.data)
    return path


def check_pixels(upload: Upload, path: Path, max_pixels: int) -> tuple[int, int]:
    """(H, W) from the header; refuses non-images (400) and too many pixels (413) before decoding."""
    if not upload.data:
        raise UploadError(upload.label, "the file is empty")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise UploadError(upload.label, "not an image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UploadError(upload.label, f"cannot read the image: {e}") from None
    if w * h > max_pixels:
        raise UploadError(upload.label, f"image is {w}x{h} = {w * h:,} pixels, over this server's limit of "
                                        f"{max_pixels:,} pixels", status=413)
    return h, w


def _relabel(e: InputError, upload: Upload) -> UploadError:
    return UploadError(upload.label, e.problem)


def decode_image(upload: Upload, tmpdir: Path, index: int, *, max_pixels: int, min_size: int) -> np.ndarray:
    path = _to_temp(upload, tmpdir, index)
    check_pixels(upload, path, max_pixels)
    try:
        return load_image(path, max_pixels=max_pixels, min_size=min_size, name=upload.label)
    except InputError as e:
        raise _relabel(e, upload) from None


def decode_mask(upload: Upload, tmpdir: Path, index: int, *, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    path = _to_temp(upload, tmpdir, index)
    check_pixels(upload, path, max_pixels)
    try:
        return load_mask(path, size=size, max_pixels=max_pixels, name=upload.label)
    except InputError as e:
        raise _relabel(e, upload) from None


def image_format(data: bytes) -> str:
    """File extension for an image's bytes, by content (png, jpg, bmp, tif, webp)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "png").lower()
    except Exception:
        return "bin"
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


# -- encodings --------------------------------------------------------------------------------

def png_bytes(a: np.ndarray, level: int = 6) -> bytes:
    """uint8 / bool array -> PNG bytes (``level`` 1 is ~2x faster than 6 on score maps, ~50 % larger)."""
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", optimize=False, compress_level=level)
    return buf.getvalue()


def jpeg_bytes(a: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(a)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rle_encode(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: column-major runs, starting with a (possibly empty) run of zeros.

    ``pycocotools.mask.frPyObjects(rle, h, w)`` reads it; :func:`rle_decode` is the inverse."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    flat = m.flatten(order="F").astype(np.int8)
    if flat.size == 0:
        return {"size": [h, w], "counts": []}
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [h, w], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    flat = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for c in rle["counts"]:
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    return flat.reshape((w, h)).T
