"""Precision: the dtype names a config uses, which one ``auto`` picks, and their torch types.

Importing this module does not import torch (the config loads it); :func:`torch_dtype` does.
"""

from __future__ import annotations

from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16`` (one of :data:`DTYPES`)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {list(DTYPES)}")
    return getattr(torch, name)


def cpu_bf16_instructions() -> list[str]:
    """The CPU's bf16 matmul instructions (amx_bf16, avx512_bf16) that this machine's Linux reports."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted({"amx_bf16", "avx512_bf16"} & set(flags))


def auto_dtype(device: str) -> str:
    """model.dtype=auto: bfloat16 where it is fast (CUDA; a CPU with AMX or AVX512-BF16), else float32."""
    if device == "cuda" or cpu_bf16_instructions():
        return "bfloat16"
    return "float32"
