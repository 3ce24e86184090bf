"""Reading images and masks: any PIL mode in, RGB uint8 / boolean masks out.

Rules (documented in docs/input-rules.md):

* Images of every PIL mode become HxWx3 uint8 RGB.  Alpha is dropped (LA, RGBA,
  PA), palettes are expanded (P), 16/32-bit grey (I;16, I, F) is scaled to 8 bit
  by its bit depth: values up to 255 are kept, otherwise divided by the smallest
  ``2**b - 1 >= max`` (so a 12-bit image fills the 8-bit range like a 16-bit one).
* Masks: any non-zero pixel is defect for hard masks (0/1, 0/255, index masks);
  a "soft" mask (more than ``SOFT_MASK_LEVELS`` distinct grey values, e.g.
  anti-aliased or probability masks) is thresholded at ``>= 128`` of 255.
* Images larger than ``max_pixels`` (default 100 megapixels) are refused before
  they are decoded (decompression-bomb guard).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

#: a path, an image already in memory, or the bytes of an encoded image file (PNG, JPEG, ...)
ImageLike = Union[str, Path, np.ndarray, Image.Image, bytes]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 100_000_000
SOFT_MASK_LEVELS = 16

# We do our own size check before decoding; let PIL's own guard sit above ours.
Image.MAX_IMAGE_PIXELS = None


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        raise InputError(path, "is a folder, expected an image file")
    return _open_file(path, path, max_pixels)


def _open_file(fp, path, max_pixels: int) -> Image.Image:
    """Open and decode one encoded image (a path or a binary file object); ``path`` names it in errors."""
    try:
        im = Image.open(fp)
    except UnidentifiedImageError:
        raise InputError(path, "not a readable image (unknown or corrupt format)") from None
    except OSError as e:
        raise InputError(path, f"cannot open image: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise InputError(
            path, f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            "(decompression-bomb guard; raise max_pixels if this is intended)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(path, f"image data is corrupt or truncated ({e})") from None
    return im


def _grey_to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    a = np.clip(a, 0, None)
    top = float(a.max()) if a.size else 0.0
    if top <= 255:
        return np.clip(np.round(a), 0, 255).astype(np.uint8)
    bits = int(np.ceil(np.log2(top + 1)))
    return np.clip(np.round(a * 255.0 / (2 ** bits - 1)), 0, 255).astype(np.uint8)


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL image -> HxWx3 uint8 RGB."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        g = _grey_to_uint8(np.array(im))
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA")
    if mode == "1":
        im = im.convert("L")
    return np.array(im.convert("RGB"))


def array_to_rgb(a: np.ndarray, source: str = "array") -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        return np.repeat(_grey_to_uint8(a)[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        if a.shape[2] == 1:
            return np.repeat(_grey_to_uint8(a[..., 0])[..., None], 3, axis=2)
        if a.dtype != np.uint8:
            if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
                a = np.clip(a * 255.0, 0, 255)
            a = _grey_to_uint8(a)
        return np.ascontiguousarray(a[..., :3])
    raise InputError(source, f"expected an HxW or HxWx3 image array, got shape {a.shape}")


def load_image(image: ImageLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: int = 1, name: str | None = None) -> np.ndarray:
    """Load an image (path, PIL image or array) as HxWx3 uint8 RGB.

    Raises :class:`InputError` naming the file on every problem.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        src = name or str(path)
        rgb = pil_to_rgb(_open(path, max_pixels))
    elif isinstance(image, (bytes, bytearray, memoryview)):
        src = name or "image bytes"
        rgb = pil_to_rgb(_open_file(io.BytesIO(image), src, max_pixels))
    elif isinstance(image, Image.Image):
        src = name or "PIL image"
        if image.size[0] * image.size[1] > max_pixels:
            raise InputError(src, f"image is {image.size[0]}x{image.size[1]}, over the {max_pixels:,}-pixel limit")
        rgb = pil_to_rgb(image)
    elif isinstance(image, np.ndarray):
        src = name or "array"
        if image.ndim >= 2 and image.shape[0] * image.shape[1] > max_pixels:
            raise InputError(src, f"image is {image.shape[1]}x{image.shape[0]}, over the {max_pixels:,}-pixel limit")
        rgb = array_to_rgb(image, src)
    else:
        raise InputError(name, f"expected an image path, encoded image bytes, PIL image or numpy array, got {type(image).__name__}")
    h, w = rgb.shape[:2]
    if min(h, w) < min_size:
        raise InputError(src, f"image is {w}x{h}, smaller than the {min_size} px the backbone needs")
    return rgb


def binarise_mask(a: np.ndarray) -> np.ndarray:
    """Grey / index / soft mask values -> boolean defect mask (rules in the module doc)."""
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if a.ndim == 3:
        a = a.max(axis=2)
    if np.issubdtype(a.dtype, np.floating):
        if a.size and float(np.nanmax(a)) <= 1.0:
            return np.nan_to_num(a) >= 0.5
        a = _grey_to_uint8(a)
    levels = np.unique(a)
    if len(levels) > SOFT_MASK_LEVELS:
        if a.dtype != np.uint8:
            a = _grey_to_uint8(a)
        return a >= 128
    return a > 0


def load_mask(mask: ImageLike, *, size: tuple[int, int] | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Load a mask as an HxW bool array; ``size`` = (H, W) it must match."""
    if isinstance(mask, (str, Path)):
        src = name or str(mask)
        im = _open(Path(mask), max_pixels)
        if im.mode in ("RGBA", "LA", "PA"):
            alpha = np.array(im.getchannel("A"))
            if alpha.min() < 255 and len(np.unique(np.array(im.convert("L")))) <= 1:
                # a painted mask whose strokes live in the alpha channel
                arr = alpha
            else:
                arr = np.array(im.convert("L"))
        elif im.mode == "P":
            arr = np.array(im)  # palette indices: index masks, 0 = background
        elif im.mode in ("RGB", "CMYK", "YCbCr", "HSV", "LAB"):
            arr = np.array(im.convert("RGB")).max(axis=2)
        else:
            arr = np.array(im)
    elif isinstance(mask, Image.Image):
        src = name or "PIL mask"
        arr = np.array(mask.convert("L") if mask.mode not in ("1", "L", "P", "I", "I;16", "F") else mask)
    elif isinstance(mask, np.ndarray):
        src = name or "mask array"
        arr = mask
        if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
            arr = arr[..., :3].max(axis=2)
        elif arr.ndim != 2:
            raise InputError(src, f"expected an HxW mask array, got shape {mask.shape}")
    else:
        raise InputError(name, f"expected a mask path, PIL image or numpy array, got {type(mask).__name__}")
    m = binarise_mask(arr)
    if size is not None and tuple(m.shape[:2]) != tuple(size):
        raise InputError(src, f"mask is {m.shape[1]}x{m.shape[0]} but its image is {size[1]}x{size[0]}")
    return m


def check_support_mask(mask: np.ndarray, source: str) -> None:
    """A support mask must show both defect and background."""
    n = int(mask.sum())
    if n == 0:
        raise InputError(source, "support mask is empty: paint at least one defect pixel")
    if n == mask.size:
        raise InputError(source, "support mask covers the whole image: leave some background")


def image_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(H, W) from the header only (no decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise InputError(path, "not a readable image (unknown or corrupt format)") from None
    except OSError as e:
        raise InputError(path, f"cannot open image: {e}") from None
    if w * h > max_pixels:
        raise InputError(path, f"image is {w}x{h}, over the {max_pixels:,}-pixel limit")
    return h, w
