"""What the machine can do fast (bf16 matrix multiply on this CPU / GPU?) and the numeric path a
segmenter takes: ``precision`` fp32, bf16 or auto (bf16 only where it is fast).

The two paths give slightly different features (the backbone under bf16 autocast differs from fp32 by
about 0.01 in a margin), so the same supports can give other masks on another CPU: the path in use is
named in every plan and bench output, ``FDSEG_PRECISION`` forces it (docs/precision.md)."""
from __future__ import annotations

import functools
import os

import torch

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matmul is faster than fp32: CUDA with bf16 support, or a CPU
    with AVX-512 BF16 / AMX. (On an AVX2-only CPU bf16 matmul is emulated and ~15x
    slower than fp32, measured on an AVX2-only AMD EPYC.)"""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return any(f in cpu_flags() for f in _BF16_CPU_FLAGS) and _onednn_bf16()


@functools.lru_cache(maxsize=None)
def _onednn_bf16() -> bool:
    """Whether oneDNN will run bf16 kernels here (False where ``ONEDNN_MAX_CPU_ISA`` caps it below
    AVX-512, as on an AVX2 CPU: what CI's AVX2 path is reproduced with on an AVX-512 machine)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):      # a torch without the check: the CPU flags decide
        return True


PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_ENV = "FDSEG_PRECISION"


def precision_setting(value: str | None = None) -> str:
    """``value`` (auto, fp32, bf16) or, when None, ``$FDSEG_PRECISION`` (default auto), checked."""
    from .errors import InputError
    name = "precision"
    if value is None:
        value, name = os.environ.get(PRECISION_ENV, "").strip() or "auto", PRECISION_ENV
    v = str(value).strip().lower()
    if v not in PRECISIONS:
        raise InputError(name, f"choose auto, fp32 or bf16, got {value!r}")
    return v


def resolve_precision(value: str | None = None, device: torch.device | str = "cpu") -> tuple[str, str]:
    """-> (the numeric path, ``"fp32"`` or ``"bf16"``, and why): ``value`` or ``$FDSEG_PRECISION``;
    ``auto`` is bf16 where it is fast (:func:`fast_bf16`), fp32 elsewhere."""
    setting = precision_setting(value)
    src = "precision" if value is not None else (PRECISION_ENV if os.environ.get(PRECISION_ENV, "").strip()
                                                  else "precision")
    if setting != "auto":
        return setting, f"{src}={setting}" + (" (slow where the hardware has no fast bf16)"
                                              if setting == "bf16" and not fast_bf16(device) else "")
    dev = torch.device(device)
    if fast_bf16(dev):
        what = "the GPU runs bf16 fast" if dev.type == "cuda" else "the CPU has AVX-512 BF16 / AMX"
        return "bf16", f"auto: {what} (backbone under bf16 autocast, matching in bf16)"
    what = "the GPU has no fast bf16" if dev.type == "cuda" else "the CPU has no fast bf16 (e.g. AVX2 only)"
    return "fp32", f"auto: {what}"


def matmul_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``precision``: 'fp32', 'bf16' or 'auto' (bf16 only where it is fast)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")


def describe_cpu() -> str:
    name, family = "unknown CPU", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("cpu family") and not family:
                    family = line.split(":", 1)[1].strip()
                if name != "unknown CPU" and family:
                    break
    except OSError:
        pass
    if family:          # a bare "AMD EPYC" says little: the family tells the generation (25 = Zen 3/4)
        name = f"{name}, cpu family {family}"
    import os
    simd = "AVX-512" if "avx512f" in cpu_flags() else ("AVX2" if "avx2" in cpu_flags() else "no AVX2")
    bf16 = ", bf16" if fast_bf16("cpu") else ""
    return f"{name} ({os.cpu_count()} cores, {simd}{bf16})"
