"""Build a SAM2 model from a config (a YAML file or a config shipped with ``sam2``) + a checkpoint.

``sam2.build_sam`` needs hydra's global config search path and raises bare ``RuntimeError`` on a
mismatched checkpoint; here the config is read with OmegaConf, instantiated with hydra's
``instantiate``, and every problem becomes an :class:`~fdseg.errors.InputError` naming the file.
Checkpoints are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from pathlib import Path

import torch

from ..checkpoint import read_torch_file
from ..errors import InputError, MissingExtraError

KINDS = {"image": "sam2.modeling.sam2_base.SAM2Base", "video": "sam2.sam2_video_predictor.SAM2VideoPredictor"}
# what sam2.build_sam.build_sam2_video_predictor sets (apply_postprocessing=True)
VIDEO_OVERRIDES = {
    "sam_mask_decoder_extra_args": {"dynamic_multimask_via_stability": True,
                                    "dynamic_multimask_stability_delta": 0.05,
                                    "dynamic_multimask_stability_thresh": 0.98},
    "binarize_mask_from_pts_for_mem_enc": True,
    "fill_hole_area": 8,
}
IMAGE_OVERRIDES = {"sam_mask_decoder_extra_args": VIDEO_OVERRIDES["sam_mask_decoder_extra_args"]}
# released checkpoint names -> the config sam2 ships for them
_SIZES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


def require_sam2(feature: str = "this SAM2 feature"):
    """Import ``sam2`` (and hydra / omegaconf) or raise :class:`MissingExtraError` naming ``fdseg[sam]``."""
    try:
        sam2 = importlib.import_module("sam2")
        importlib.import_module("hydra.utils")
        importlib.import_module("omegaconf")
    except ImportError as e:
        raise MissingExtraError(feature, "sam", "sam2") from e
    return sam2


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA, nothing on the CPU (bf16 is slow on most CPUs)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_config(config: str | Path | None, checkpoint: str | Path | None = None) -> Path:
    """The config file: a path, a name shipped with sam2 (``configs/sam2.1/sam2.1_hiera_t.yaml``),
    or (config None) the shipped config matching a released checkpoint's name."""
    sam2 = require_sam2("SAM2 configs")
    pkg = Path(sam2.__file__).parent
    if config is None:
        stem = Path(str(checkpoint or "")).stem        # sam2.1_hiera_tiny, sam2_hiera_large, ...
        for long, short in _SIZES.items():
            if stem.endswith(f"_hiera_{long}"):
                version = "sam2.1" if stem.startswith("sam2.1") else "sam2"
                config = f"configs/{version}/{version}_hiera_{short}.yaml"
                break
        else:
            raise InputError("--sam2-config", f"give the SAM2 model config for checkpoint {checkpoint} "
                                              f"(a YAML file or e.g. configs/sam2.1/sam2.1_hiera_t.yaml)")
    p = Path(config)
    if p.is_file():
        return p
    name = str(config).lstrip("/")
    for cand in (pkg / name, pkg / "configs" / name, pkg / f"{name}.yaml", pkg / "configs" / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise InputError(config, "SAM2 config not found (neither a file nor a config shipped with sam2, "
                             "e.g. configs/sam2.1/sam2.1_hiera_t.yaml)")


def _model_cfg(config: Path, kind: str):
    from omegaconf import OmegaConf
    try:
        cfg = OmegaConf.load(config)
    except Exception as e:
        raise InputError(config, f"not a readable YAML config ({e})") from None
    if "model" not in cfg or "_target_" not in cfg.model:
        raise InputError(config, "not a SAM2 model config (no 'model' section with a '_target_')")
    if not str(cfg.model._target_).startswith("sam2."):
        raise InputError(config, f"not a SAM2 model config (model is {cfg.model._target_})")
    model = cfg.model
    model._target_ = KINDS[kind]
    over = VIDEO_OVERRIDES if kind == "video" else IMAGE_OVERRIDES
    if kind == "video" and importlib.util.find_spec("sam2._C") is None:
        # hole filling needs sam2's compiled extension; without it sam2 skips it with a warning per call
        over = {**over, "fill_hole_area": 0}
    return OmegaConf.merge(model, OmegaConf.create(over))


def instantiate_sam2(config: str | Path, kind: str = "image") -> torch.nn.Module:
    """A randomly initialised SAM2 model (``kind`` 'image' = SAM2Base, 'video' = SAM2VideoPredictor)."""
    require_sam2("SAM2")
    from hydra.utils import instantiate
    path = resolve_config(config)
    try:
        return instantiate(_model_cfg(path, kind), _recursive_=True)
    except InputError:
        raise
    except Exception as e:
        raise InputError(path, f"cannot build a SAM2 model from this config: {type(e).__name__}: {e}") from None


def load_sam2_state(checkpoint: str | Path) -> dict:
    ck = Path(checkpoint)
    obj = read_torch_file(ck, missing="SAM2 checkpoint not found",
                          unreadable="cannot be read as a SAM2 checkpoint (a torch file of tensors under 'model')")
    sd = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(ck, "not a SAM2 checkpoint: expected a dict with a 'model' state dict")
    return sd


def build_sam2(config: str | Path | None, checkpoint: str | Path, kind: str = "image",
               device: torch.device | str = "cpu") -> torch.nn.Module:
    """SAM2 model with the checkpoint's weights, in eval mode on ``device``."""
    if checkpoint is None:
        raise InputError("--sam2-checkpoint", "a SAM2 checkpoint is needed (e.g. sam2.1_hiera_tiny.pt)")
    require_sam2("SAM2")
    sd = load_sam2_state(checkpoint)
    path = resolve_config(config, checkpoint)
    model = instantiate_sam2(path, kind)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        ex = (missing or unexpected or wrong)[:3]
        raise InputError(checkpoint, f"does not match SAM2 config {path.name}: {len(missing)} missing, "
                                     f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped weights "
                                     f"(e.g. {', '.join(ex)}); a checkpoint of another SAM2 size or "
                                     f"another model family?")
    model.load_state_dict(sd)
    return model.to(device).eval()


def save_random_sam2(config: str | Path, path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised SAM2 checkpoint in the released format ({'model': state_dict})."""
    torch.manual_seed(seed)
    model = instantiate_sam2(config, "image")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def fit_feature_sizes(image_predictor) -> None:
    """SAM2ImagePredictor hard-codes the feature sizes of 1024 px models; set them from the model's size."""
    n = int(image_predictor.model.image_size)
    image_predictor._bb_feat_sizes = [(n // 4, n // 4), (n // 8, n // 8), (n // 16, n // 16)]
