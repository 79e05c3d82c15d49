"""Architecture configurations: one concrete ViT picked from a search space.

Pure Python on purpose (no torch): search, costs and the CLI handle thousands of these.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitnas.space.yaml_io import check_autoformer, check_keys, dump_yaml, is_autoformer, load_yaml

__all__ = ["ArchConfig"]

# Dimension names, identical in YAML, CLI flags, ArchConfig and tables.
ARCH_KEYS = ("embed_dim", "depth", "mlp_ratios", "num_heads")
OPTIONAL_KEYS = ("patch_size",)  # ViTAS: searched patch size (absent = the supernet's fixed patch size)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ArchConfig:
    """One subnet: a single embedding width, a depth and per-layer MLP ratios and head counts.

    `mlp_ratios` and `num_heads` hold exactly `depth` entries (layer i uses entry i), as in
    AutoFormer's RETRAIN configs. Instances are hashable and compare by value.
    """

    embed_dim: int
    depth: int
    mlp_ratios: tuple[float, ...] = field(default=())
    num_heads: tuple[int, ...] = field(default=())
    patch_size: int | None = None

    def __post_init__(self) -> None:
        if self.patch_size is not None:
            p = _as_int(self.patch_size, "patch_size")
            if p <= 0:
                raise ValueError(f"patch_size must be positive, got {p}")
            object.__setattr__(self, "patch_size", p)
        embed_dim = _as_int(self.embed_dim, "embed_dim")
        depth = _as_int(self.depth, "depth")
        if embed_dim <= 0 or depth <= 0:
            raise ValueError(f"embed_dim and depth must be positive, got embed_dim={embed_dim}, depth={depth}")
        mlp = self.mlp_ratios
        heads = self.num_heads
        for name, value in (("mlp_ratios", mlp), ("num_heads", heads)):
            if isinstance(value, (str, bytes)) or value is None:
                raise ValueError(f"{name} must be a list with one value per layer, got {value!r}")
        if isinstance(mlp, (int, float)):
            mlp = (mlp,) * depth
        if isinstance(heads, (int, float)):
            heads = (heads,) * depth
        mlp = tuple(_as_float(r, f"mlp_ratios[{i}]") for i, r in enumerate(mlp))
        heads = tuple(_as_int(h, f"num_heads[{i}]") for i, h in enumerate(heads))
        if len(mlp) != depth:
            raise ValueError(f"mlp_ratios has {len(mlp)} entries, expected depth={depth}")
        if len(heads) != depth:
            raise ValueError(f"num_heads has {len(heads)} entries, expected depth={depth}")
        if any(r <= 0 for r in mlp) or any(h <= 0 for h in heads):
            raise ValueError(f"mlp_ratios and num_heads must be positive, got {mlp} and {heads}")
        object.__setattr__(self, "embed_dim", embed_dim)
        object.__setattr__(self, "depth", depth)
        object.__setattr__(self, "mlp_ratios", mlp)
        object.__setattr__(self, "num_heads", heads)

    # -- derived -----------------------------------------------------------------------------------
    def hidden_dims(self) -> tuple[int, ...]:
        """FFN hidden width per layer: int(embed_dim * mlp_ratio), as AutoFormer computes it."""
        return tuple(int(self.embed_dim * r) for r in self.mlp_ratios)

    def key(self) -> str:
        """A canonical string, equal for equal archs: use it to deduplicate candidates."""
        mlp = ",".join(f"{r:g}" for r in self.mlp_ratios)
        heads = ",".join(str(h) for h in self.num_heads)
        key = f"e{self.embed_dim}-d{self.depth}-m{mlp}-h{heads}"
        return key if self.patch_size is None else f"p{self.patch_size}-{key}"

    def __str__(self) -> str:
        return self.key()

    # -- serialization -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "mlp_ratios": list(self.mlp_ratios),
            "num_heads": list(self.num_heads),
        }
        if self.patch_size is not None:
            out["patch_size"] = self.patch_size
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "arch") -> ArchConfig:
        """Build from our keys; `source` names the file or object in error messages."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping with keys {list(ARCH_KEYS)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(ARCH_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown key {unknown[0]!r}; expected keys {list(ARCH_KEYS)}")
        missing = [k for k in ARCH_KEYS if k not in data]
        if missing:
            raise ValueError(f"{source}: missing key {missing[0]!r}; expected keys {list(ARCH_KEYS)}")
        try:
            return cls(
                embed_dim=data["embed_dim"],
                depth=data["depth"],
                mlp_ratios=_seq(data["mlp_ratios"]),
                num_heads=_seq(data["num_heads"]),
                patch_size=data.get("patch_size"),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ArchConfig:
        return cls.from_dict(json.loads(text), source="json")

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Return the YAML text; also write it (atomically) when `path` is given."""
        return dump_yaml(self.to_dict(), path)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ArchConfig:
        """Read our format (the `to_yaml` keys, optionally under `arch:`) or an AutoFormer subnet
        config (its `RETRAIN` section)."""
        path = Path(path)
        data = load_yaml(path)
        if is_autoformer(data):
            data = _from_autoformer(data, path)
        elif isinstance(data, Mapping) and "arch" in data:
            data = data["arch"]
        if isinstance(data, Mapping):
            check_keys(data, ARCH_KEYS + OPTIONAL_KEYS, str(path))
        return cls.from_dict(data, source=str(path))


def _from_autoformer(data: Mapping, path: Path) -> dict[str, Any]:
    """Our arch keys from the `RETRAIN` section of an AutoFormer config."""
    sub = check_autoformer(data, path, "RETRAIN", "the subnet of an AutoFormer config")
    embed = sub["EMBED_DIM"]
    # AutoFormer writes EMBED_DIM either as one number or repeated per layer.
    if isinstance(embed, list):
        if len(set(embed)) != 1:
            raise ValueError(f"{path}: RETRAIN.EMBED_DIM must hold one width, got {embed}")
        embed = embed[0]
    return {"embed_dim": embed, "depth": sub["DEPTH"], "mlp_ratios": sub["MLP_RATIO"], "num_heads": sub["NUM_HEADS"]}


def _seq(value: Any) -> Any:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return value
    return tuple(value)
