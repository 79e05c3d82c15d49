"""Which reduced precision a device runs fast, and the autocast dtype a run's `amp` setting resolves to.

On CUDA, bf16 where the GPU supports it, else fp16. On the CPU, bf16 pays only where the cores have native
bf16 matrix instructions (AMX-BF16 on Xeon Sapphire Rapids and later, AVX512-BF16 on Cooper Lake and
AMD Zen 4): there oneDNN's bf16 matmuls run 2-4x the fp32 rate; elsewhere bf16 is emulated and slower
than fp32, so `auto` stays fp32.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

__all__ = ["AMP_MODES", "amp_dtype", "autocast", "cpu_bf16_capability"]

log = logging.getLogger(__name__)

AMP_MODES = ("auto", "off", "bf16", "fp16")
# /proc/cpuinfo flags of native bf16 matrix support, best first, with the name we report
_BF16_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@functools.lru_cache(maxsize=1)
def cpu_bf16_capability(cpuinfo: str | None = None) -> str | None:
    """'AMX-BF16' or 'AVX512-BF16' when the CPU multiplies bf16 matrices natively, else None (read from
    /proc/cpuinfo; None where it cannot be read, e.g. off Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = _cpu_flags(cpuinfo)
    return next((name for flag, name in _BF16_FLAGS if flag in flags), None)


_logged: set[tuple[str, str]] = set()


def amp_dtype(mode: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of `mode` (auto | off | bf16 | fp16) on `device`, None for fp32. `auto`: bf16 or
    fp16 on CUDA; on the CPU bf16 where `cpu_bf16_capability()` finds native support, else fp32. The
    choice `auto` makes is logged once per device type."""
    if mode not in AMP_MODES:
        raise ValueError(f"amp={mode!r}; expected one of {AMP_MODES}")
    device = torch.device(device)
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        why = "CUDA"
    elif device.type == "cpu":
        cap = cpu_bf16_capability()
        dtype = torch.bfloat16 if cap else None
        why = f"CPU with {cap}" if cap else "CPU without native bf16"
    else:
        dtype, why = None, device.type
    if (device.type, str(dtype)) not in _logged:
        _logged.add((device.type, str(dtype)))
        log.info("amp auto: %s on %s", "fp32" if dtype is None else str(dtype).removeprefix("torch."), why)
    return dtype


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """torch.autocast for `dtype` on `device`'s type, disabled for None (fp32)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
