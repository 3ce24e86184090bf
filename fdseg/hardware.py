"""What the machine can do fast: bf16 matrix multiply on this CPU / GPU?"""
from __future__ import annotations

import functools

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
    return any(f in cpu_flags() for f in _BF16_CPU_FLAGS)


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
