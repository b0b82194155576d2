"""This machine's x86 instruction-set flags, as Linux reports them (no TVM, no torch): what the
quantization flow asks before the build target exists (is bf16 native here?) and what the
ONNX Runtime runner asks of the CPU."""
from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The ``flags`` line of ``/proc/cpuinfo`` (empty off Linux or where it cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def x86_without_vnni() -> bool:
    """An x86 CPU without an 8-bit dot-product instruction (AVX-512 VNNI or AVX-VNNI)."""
    flags = cpu_flags()
    return "avx2" in flags and not {"avx512_vnni", "avx_vnni"} & flags


def has_amx_bf16() -> bool:
    """The CPU multiplies bfloat16 tiles (AMX-BF16: Sapphire Rapids and later)."""
    return {"amx_tile", "amx_bf16"} <= cpu_flags()
