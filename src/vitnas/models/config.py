"""`ViTConfig`: everything about a ViT besides its architecture (widths, depth, heads, MLP ratios), in one
place. The static `VisionTransformer`, the `ViTSupernet`, the analytic `ViTCostModel` and the latency table
all read it, so a setting (iRPE, say) cannot reach one and miss another.

    cfg = ViTConfig.from_space(space, img_size=32, num_classes=10)   # the space's patch / head / rel-pos
    model = VisionTransformer(arch, cfg)                             # model.config == cfg.to_dict(arch)
    costs = ViTCostModel.from_config(cfg)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitnas.nn.irpe import IRPEConfig
from vitnas.nn.layers import patch_grid, to_2tuple
from vitnas.space.arch import ArchConfig

if TYPE_CHECKING:
    from vitnas.space.space import SearchSpace

__all__ = ["ARCH_DEFAULTS", "DROP_FIELDS", "GLOBAL_POOLS", "ViTConfig", "split_model_kwargs"]

GLOBAL_POOLS = ("avg", "token")
# Regularisation only: no parameter or cost depends on these.
DROP_FIELDS = ("drop_rate", "attn_drop_rate", "drop_path_rate")
# The architecture keys of `VisionTransformer.config` and their defaults (a DeiT-Ti-sized model).
ARCH_DEFAULTS: dict[str, Any] = dict(embed_dim=192, depth=12, num_heads=3, mlp_ratios=4.0)


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """A ViT's geometry and options; defaults follow AutoFormer's published runs."""

    img_size: tuple[int, int] = (224, 224)  # (height, width) in pixels; an int means a square
    patch_size: int = 16  # side of the square patches (a ViTAS arch may carry its own)
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head; forward returns the pooled features
    head_dim: int = 64  # q/k/v width per head: attention is num_heads * head_dim wide, whatever embed_dim
    qkv_bias: bool = True
    rel_pos: bool = True  # AutoFormer's 2-D relative position on keys and values
    rel_pos_max: int = 14  # its largest distance, in patches, per axis
    abs_pos: bool = True  # a learned absolute position embedding (class token included)
    global_pool: str = "avg"  # "avg": mean of the patch tokens; "token": the class token
    norm_eps: float = 1e-5
    drop_rate: float = 0.0  # dropout after the embedding, in attention's projection and in the MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float | tuple[float, ...] = 0.0  # one rate, grown linearly from 0 over the depth; or one per layer
    irpe: dict[str, Any] | None = field(default=None, hash=False)  # iRPE (vitnas.nn.irpe.IRPEConfig fields); None: off

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "img_size", to_2tuple(self.img_size))
        if not isinstance(self.drop_path_rate, (int, float)):
            set_(self, "drop_path_rate", tuple(float(p) for p in self.drop_path_rate))
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={self.global_pool!r}; expected one of {GLOBAL_POOLS}")
        set_(self, "irpe", dict(self.irpe) if self.irpe else None)
        if self.irpe:
            IRPEConfig(**self.irpe)  # unknown or bad iRPE settings fail here, not at the first forward

    @classmethod
    def from_space(cls, space: SearchSpace, **overrides: Any) -> ViTConfig:
        """The config a supernet on `space` uses: the space's img_size, patch_size, head_dim and rel_pos_max
        unless `overrides` give them; an override of None keeps the default."""
        defaults = dict(
            img_size=space.img_size, patch_size=space.patch_size, head_dim=space.head_dim, rel_pos_max=space.rel_pos_max
        )
        return cls(**{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def irpe_config(self) -> IRPEConfig | None:
        return IRPEConfig(**self.irpe) if self.irpe else None

    @property
    def rel_pos_distance(self) -> int | None:
        """`rel_pos_max` when relative position is on, else None: what layers and cost models take."""
        return self.rel_pos_max if self.rel_pos else None

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row (raises when the patch size does not divide the image)."""
        return patch_grid(self.img_size, self.patch_size)

    def drop_path_rates(self, depth: int) -> list[float]:
        """One stochastic-depth rate per layer of a `depth`-layer model."""
        if isinstance(self.drop_path_rate, (int, float)):
            return [float(self.drop_path_rate) * i / max(depth - 1, 1) for i in range(depth)]
        if len(self.drop_path_rate) != depth:
            raise ValueError(f"drop_path_rate has {len(self.drop_path_rate)} entries, expected depth={depth}")
        return list(self.drop_path_rate)

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self, arch: ArchConfig | None = None) -> dict[str, Any]:
        """Plain JSON values; with `arch`, `VisionTransformer.config` (its keys in its order), which
        `VisionTransformer(**d)` and `split_model_kwargs` read back."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["img_size"] = list(self.img_size)
        if isinstance(self.drop_path_rate, tuple):
            d["drop_path_rate"] = list(self.drop_path_rate)
        d["irpe"] = dict(self.irpe) if self.irpe else None
        if arch is None:
            return d
        items = list(d.items())
        dims = dict(
            embed_dim=arch.embed_dim, depth=arch.depth, num_heads=list(arch.num_heads), mlp_ratios=list(arch.mlp_ratios)
        )
        return dict(items[:4] + list(dims.items()) + items[4:])  # after num_classes, as written since v0.1


def split_model_kwargs(kwargs: Mapping[str, Any]) -> tuple[ArchConfig, ViTConfig]:
    """`VisionTransformer` keywords (`model.config`) -> (arch, config); missing ones take their defaults,
    unknown ones raise TypeError."""
    rest = dict(kwargs)
    dims = {k: rest.pop(k, v) for k, v in ARCH_DEFAULTS.items()}
    arch = ArchConfig(dims["embed_dim"], dims["depth"], dims["mlp_ratios"], dims["num_heads"])  # expands per layer
    return arch, ViTConfig(**rest)
