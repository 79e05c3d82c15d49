"""Measured latency on the current device, and a per-block lookup table to predict it during search.

The table holds the median time of one transformer block for every (embed_dim, heads, mlp_ratio)
choice, and of the stem (patch embedding, tokens, final norm and head) for every width, measured
once per device, thread count, batch size and space, and cached on disk as JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitnas._io import atomic_write_text
from vitnas.space.arch import ArchConfig
from vitnas.space.space import SearchSpace

__all__ = ["measure_latency", "LatencyTable"]

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(model: nn.Module, inputs: torch.Tensor, *, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of `model(inputs)` in milliseconds, after `warmup` untimed runs."""
    model.eval()
    device = inputs.device
    for _ in range(warmup):
        model(inputs)
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model(inputs)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip()


class LatencyTable:
    """Predicted latency of an arch = stem[embed] + sum of block[embed, heads, hidden] over its layers."""

    def __init__(self, entries: dict[str, float], meta: dict[str, Any]) -> None:
        self.entries = entries
        self.meta = meta

    @staticmethod
    def _block_key(embed: int, heads: int, hidden: int) -> str:
        return f"block/{embed}/{heads}/{hidden}"

    def predict(self, arch: ArchConfig) -> float:
        try:
            total = self.entries[f"stem/{arch.embed_dim}"]
            for h, hidden in zip(arch.num_heads, arch.hidden_dims()):
                total += self.entries[self._block_key(arch.embed_dim, h, hidden)]
        except KeyError as err:
            raise ValueError(
                f"the latency table has no entry {err.args[0]!r}: {arch.key()} uses a value outside the space's choices"
            ) from None
        return total

    __call__ = predict

    @classmethod
    def build(
        cls,
        space: SearchSpace,
        model_kwargs: dict[str, Any],
        *,
        batch: int = 1,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        warmup: int = 3,
        reps: int = 10,
    ) -> LatencyTable:
        """Measure (or read from the cache) every block and stem of the space on this device."""
        from vitnas.models.vit import Block, VisionTransformer

        if space.patch_sizes is not None:
            raise ValueError(
                f"space {space.name!r} searches the patch size; the latency table supports one patch "
                f"size per space for now (constrain params or macs instead)"
            )
        device = torch.device(device)
        key_data = {
            "device": device_name(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "batch": batch,
            "space": space.to_dict(),
            "model": model_kwargs,
        }
        digest = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:16]
        cache = (
            Path(cache_dir)
            if cache_dir
            else Path(os.environ.get("VITNAS_CACHE", Path.home() / ".cache" / "vitnas")) / "latency"
        )
        path = cache / f"{space.name}-b{batch}-{digest}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                log.info("latency table from %s", path)
                return cls(data["entries"], data["meta"])
            except (json.JSONDecodeError, KeyError) as err:  # a damaged cache is measured again
                log.warning("ignoring unreadable latency cache %s: %s", path, err)
        kw = dict(model_kwargs)
        h, w = kw["img_size"] if isinstance(kw["img_size"], (list, tuple)) else (kw["img_size"],) * 2
        tokens = (h // kw["patch_size"]) * (w // kw["patch_size"]) + 1
        grid = (h // kw["patch_size"], w // kw["patch_size"])
        rel = kw.get("rel_pos_max") if kw.get("rel_pos", True) else None
        entries: dict[str, float] = {}
        t0 = time.perf_counter()
        for e in space.embed_dim:
            x = torch.randn(batch, tokens, e, device=device)
            for heads in space.num_heads:
                for r in space.mlp_ratio:
                    hidden = int(e * r)
                    block = Block(
                        e,
                        heads,
                        hidden,
                        head_dim=space.head_dim,
                        rel_pos_max=rel,
                        qkv_bias=kw.get("qkv_bias", True),
                        norm_eps=kw.get("norm_eps", 1e-5),
                    ).to(device)
                    entries[cls._block_key(e, heads, hidden)] = measure_latency(
                        _WithGrid(block, grid), x, warmup=warmup, reps=reps
                    )
            one = ArchConfig(e, 1, (space.mlp_ratio[0],), (space.num_heads[0],))
            model = VisionTransformer.from_arch(one, **kw).to(device)
            images = torch.randn(batch, kw.get("in_chans", 3), h, w, device=device)
            full = measure_latency(model, images, warmup=warmup, reps=reps)
            entries[f"stem/{e}"] = max(full - entries[cls._block_key(e, one.num_heads[0], one.hidden_dims()[0])], 0.0)
        meta = {**key_data, "seconds_to_build": time.perf_counter() - t0}
        atomic_write_text(path, json.dumps({"entries": entries, "meta": meta}, default=str))
        log.info("measured a %d-entry latency table in %.1fs (%s)", len(entries), meta["seconds_to_build"], path)
        return cls(entries, meta)

    def error_report(
        self,
        supernet: nn.Module,
        archs: list[ArchConfig],
        *,
        batch: int = 1,
        device: str | torch.device = "cpu",
        reps: int = 10,
    ) -> dict[str, float]:
        """Predicted vs measured latency of extracted subnets: mean and max absolute relative error."""
        device = torch.device(device)
        errors = []
        for arch in archs:
            model = supernet.extract(arch).to(device)
            h, w = model.config["img_size"]
            measured = measure_latency(
                model, torch.randn(batch, model.config["in_chans"], h, w, device=device), reps=reps
            )
            errors.append(abs(self.predict(arch) - measured) / measured)
        return {"mean_abs_rel_error": statistics.fmean(errors), "max_abs_rel_error": max(errors), "n": len(archs)}


class _WithGrid(nn.Module):
    def __init__(self, block: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.block, self.grid = block, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.grid)
