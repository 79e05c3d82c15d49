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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vitnas._io import atomic_write_text
from vitnas.space.arch import ArchConfig
from vitnas.space.space import SearchSpace

if TYPE_CHECKING:
    from vitnas.models.config import ViTConfig

__all__ = ["measure_latency", "LatencyTable"]

log = logging.getLogger(__name__)
# Part of every table's cache key: 2 = blocks carry the models' iRPE (tables before it timed them without).
TABLE_FORMAT = 2


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
        config: ViTConfig | Mapping[str, Any],
        *,
        batch: int = 1,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        warmup: int = 3,
        reps: int = 10,
    ) -> LatencyTable:
        """Measure (or read from the cache) every block and stem of the space on this device. `config` is the
        models' `ViTConfig` (a supernet's `vit_config`), or its `VisionTransformer` keywords (`model_kwargs`);
        blocks are built from it as the models build theirs, iRPE included."""
        from vitnas.models.config import DROP_FIELDS, ViTConfig

        if space.patch_sizes is not None:
            raise ValueError(
                f"space {space.name!r} searches the patch size; the latency table supports one patch "
                f"size per space for now (constrain params or macs instead)"
            )
        cfg = config if isinstance(config, ViTConfig) else ViTConfig(**config)
        cfg = cfg.replace(drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)  # timed in eval mode
        device = torch.device(device)
        key_data = {
            "format": TABLE_FORMAT,
            "device": device_name(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "batch": batch,
            "space": space.to_dict(),
            "model": {k: v for k, v in cfg.to_dict().items() if k not in DROP_FIELDS},
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
        t0 = time.perf_counter()
        entries = _measure(space, cfg, batch, device, warmup, reps)
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


def _measure(
    space: SearchSpace, cfg: ViTConfig, batch: int, device: torch.device, warmup: int, reps: int
) -> dict[str, float]:
    """Median times of every (embed, heads, hidden) block and of every width's stem (a one-block model
    less its block)."""
    from vitnas.models.vit import VisionTransformer, build_block

    h, w = cfg.img_size
    grid = cfg.grid
    tokens = grid[0] * grid[1] + 1
    entries: dict[str, float] = {}
    for e in space.embed_dim:
        x = torch.randn(batch, tokens, e, device=device)
        for heads in space.num_heads:
            for r in space.mlp_ratio:
                hidden = int(e * r)
                block = build_block(cfg, e, heads, hidden).to(device)
                entries[LatencyTable._block_key(e, heads, hidden)] = measure_latency(
                    _WithGrid(block, grid), x, warmup=warmup, reps=reps
                )
        one = ArchConfig(e, 1, (space.mlp_ratio[0],), (space.num_heads[0],))
        model = VisionTransformer(one, cfg).to(device)
        images = torch.randn(batch, cfg.in_chans, h, w, device=device)
        full = measure_latency(model, images, warmup=warmup, reps=reps)
        block_key = LatencyTable._block_key(e, one.num_heads[0], one.hidden_dims()[0])
        entries[f"stem/{e}"] = max(full - entries[block_key], 0.0)
    return entries


class _WithGrid(nn.Module):
    def __init__(self, block: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.block, self.grid = block, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.grid)
