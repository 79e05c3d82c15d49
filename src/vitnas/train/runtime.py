"""Process-wide settings a run asks for (CPU threads, deterministic kernels), applied for the run's
duration and restored afterwards, so a run never changes the process it is started from."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["runtime_settings"]


@contextlib.contextmanager
def runtime_settings(threads: int | None = None, deterministic: bool = False) -> Iterator[None]:
    """`threads` CPU threads (None: leave as is) and deterministic kernels for the body; the global CPU
    RNG state is saved and restored too (the trainer seeds it per step)."""
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    rng = torch.get_rng_state()
    try:
        if threads:
            torch.set_num_threads(threads)
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
            torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.set_num_threads(old_threads)
        if torch.are_deterministic_algorithms_enabled() != old_deterministic:  # the call imports torch._dynamo (~4 s)
            torch.use_deterministic_algorithms(old_deterministic, warn_only=warn_only)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
        torch.set_rng_state(rng)
