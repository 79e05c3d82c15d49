"""Search spaces: the only place where legal architecture values are defined."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from vitnas.space.arch import ArchConfig
from vitnas.space.presets import PRESETS
from vitnas.space.yaml_io import check_autoformer, check_keys, dump_yaml, is_autoformer, load_yaml

__all__ = ["SearchSpace", "LAYER_PROB", "DEPTH_PROB", "EMBED_PROB"]

# AutoFormer's mutation probabilities: the one definition; search strategies and configs use these.
LAYER_PROB = 0.2  # each layer's mlp ratio and heads
DEPTH_PROB = 0.4  # the depth
EMBED_PROB = 0.4  # the embedding width (and a searched patch size)

_REQUIRED = ("embed_dim", "depth", "mlp_ratio", "num_heads")


def _choices(value: Any, name: str, kind: type) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a non-empty list of choices, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{name} choices must be positive numbers, got {v!r}")
        if kind is int and int(v) != v:
            raise ValueError(f"{name} choices must be integers, got {v!r}")
        out.append(kind(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} choices contain duplicates: {out}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class SearchSpace:
    """Choices per dimension plus the supernet's capacity and model defaults.

    `max_*` is the supernet's capacity; it defaults to the largest choice but may exceed it, as in
    AutoFormer (the tiny supernet is 256 wide while its largest choice is 240). `img_size`,
    `patch_size`, `head_dim` and `rel_pos_max` are the defaults a supernet built on this space uses.
    """

    embed_dim: tuple[int, ...]
    depth: tuple[int, ...]
    mlp_ratio: tuple[float, ...]
    num_heads: tuple[int, ...]
    max_embed_dim: int | None = None
    max_depth: int | None = None
    max_mlp_ratio: float | None = None
    max_num_heads: int | None = None
    head_dim: int = 64
    img_size: int = 224
    patch_size: int = 16
    rel_pos_max: int = 14
    patch_sizes: tuple[int, ...] | None = None  # ViTAS: searched patch sizes (each with its own tokens)
    private_qk: bool = False  # ViTAS: q/k private to each num_heads choice, v shared
    bilateral: bool = False  # BCNet / ViTAS: widths sliced from either edge; training alternates, search averages
    name: str = "custom"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "embed_dim", _choices(self.embed_dim, "embed_dim", int))
        set_(self, "depth", _choices(self.depth, "depth", int))
        set_(self, "mlp_ratio", _choices(self.mlp_ratio, "mlp_ratio", float))
        set_(self, "num_heads", _choices(self.num_heads, "num_heads", int))
        for dim, kind in (("embed_dim", int), ("depth", int), ("mlp_ratio", float), ("num_heads", int)):
            cap_name = f"max_{dim}"
            cap = getattr(self, cap_name)
            largest = max(getattr(self, dim))
            cap = largest if cap is None else kind(cap)
            if cap < largest:
                raise ValueError(f"{cap_name}={cap} is smaller than the largest {dim} choice {largest}")
            set_(self, cap_name, cap)
        if self.patch_sizes is not None:
            set_(self, "patch_sizes", _choices(self.patch_sizes, "patch_sizes", int))
            for p in self.patch_sizes:
                if self.img_size % p:
                    raise ValueError(f"patch size {p} does not divide img_size={self.img_size}")
        for name in ("head_dim", "img_size", "patch_size", "rel_pos_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    # -- presets and files -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> SearchSpace:
        """`autoformer-tiny`, `autoformer-small`, `autoformer-base` (the reference spaces), `cifar` or
        `digits`."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown search space preset {name!r}; choose one of {sorted(PRESETS)}") from None

    @staticmethod
    def presets() -> list[str]:
        return sorted(PRESETS)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        """Read our format (the `to_yaml` keys, optionally under `space:`) or an AutoFormer config
        (`SUPERNET` + `SEARCH_SPACE` sections)."""
        path = Path(path)
        data = load_yaml(path)
        if is_autoformer(data):
            kwargs = _from_autoformer(data, path)
        else:
            if isinstance(data, Mapping) and "space" in data:
                data = data["space"]
            kwargs = dict(check_keys(data, _space_keys(), str(path), required=_REQUIRED))
            kwargs.setdefault("name", path.stem)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Return the YAML text; also write it (atomically) when `path` is given."""
        return dump_yaml(self.to_dict(), path)

    def with_(self, **changes: Any) -> SearchSpace:
        return replace(self, **changes)

    # -- membership --------------------------------------------------------------------------------
    def violations(self, arch: ArchConfig) -> list[str]:
        """Every way `arch` leaves the choices, as messages naming dimension, value and choices."""
        out = []
        if arch.embed_dim not in self.embed_dim:
            out.append(f"embed_dim={arch.embed_dim} is not one of the allowed choices {list(self.embed_dim)}")
        if arch.depth not in self.depth:
            out.append(f"depth={arch.depth} is not one of the allowed choices {list(self.depth)}")
        for i, r in enumerate(arch.mlp_ratios):
            if r not in self.mlp_ratio:
                out.append(f"mlp_ratios[{i}]={r:g} is not one of the allowed choices {list(self.mlp_ratio)}")
        for i, h in enumerate(arch.num_heads):
            if h not in self.num_heads:
                out.append(f"num_heads[{i}]={h} is not one of the allowed choices {list(self.num_heads)}")
        out += self._patch_violations(arch)
        return out

    def _patch_violations(self, arch: ArchConfig) -> list[str]:
        if self.patch_sizes is None:
            if arch.patch_size not in (None, self.patch_size):
                return [f"patch_size={arch.patch_size} but this space has the fixed patch size {self.patch_size}"]
            return []
        if arch.patch_size not in self.patch_sizes:
            return [f"patch_size={arch.patch_size} is not one of the allowed choices {list(self.patch_sizes)}"]
        return []

    def arch_from_dict(self, data: Mapping[str, Any], *, source: str = "arch") -> ArchConfig:
        """An arch of this space's kind from its `to_dict()` form (spaces of other kinds return theirs)."""
        return ArchConfig.from_dict(data, source=source)

    def contains(self, arch: ArchConfig) -> bool:
        return not self.violations(arch)

    def __contains__(self, arch: object) -> bool:
        return isinstance(arch, ArchConfig) and self.contains(arch)

    def check_arch(self, arch: ArchConfig, *, source: str | Path | None = None) -> ArchConfig:
        """Return `arch` or raise ValueError naming the first dimension outside the space (and `source`,
        the file the arch came from)."""
        problems = self.violations(arch)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            where = f"{source}: " if source is not None else ""
            raise ValueError(f"{where}arch outside search space {self.name!r}: {problems[0]}{more}")
        return arch

    def capacity_violations(self, arch: ArchConfig) -> list[str]:
        """Ways `arch` does not fit the supernet's weights (a looser test than `contains`)."""
        out = []
        if arch.embed_dim > self.max_embed_dim:
            out.append(f"embed_dim={arch.embed_dim} exceeds the supernet's max_embed_dim={self.max_embed_dim}")
        if arch.depth > self.max_depth:
            out.append(f"depth={arch.depth} exceeds the supernet's max_depth={self.max_depth}")
        max_hidden = int(self.max_embed_dim * self.max_mlp_ratio)
        for i, hidden in enumerate(arch.hidden_dims()):
            if hidden > max_hidden:
                out.append(
                    f"mlp_ratios[{i}]={arch.mlp_ratios[i]:g} gives FFN width {hidden} above the supernet's "
                    f"{max_hidden} (max_embed_dim={self.max_embed_dim} x max_mlp_ratio={self.max_mlp_ratio:g})"
                )
        for i, h in enumerate(arch.num_heads):
            if h > self.max_num_heads:
                out.append(f"num_heads[{i}]={h} exceeds the supernet's max_num_heads={self.max_num_heads}")
        out += self._patch_violations(arch)
        return out

    def _patch(self, rng: np.random.Generator) -> int | None:
        return None if self.patch_sizes is None else int(rng.choice(self.patch_sizes))

    # -- sampling and evolution --------------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> ArchConfig:
        """Uniform sample as AutoFormer does: depth, then per-layer mlp ratio and heads, then width."""
        depth = int(rng.choice(self.depth))
        return ArchConfig(
            embed_dim=int(rng.choice(self.embed_dim)),
            depth=depth,
            mlp_ratios=tuple(float(v) for v in rng.choice(self.mlp_ratio, size=depth)),
            num_heads=tuple(int(v) for v in rng.choice(self.num_heads, size=depth)),
            patch_size=self._patch(rng),
        )

    def mutate(
        self,
        arch: ArchConfig,
        rng: np.random.Generator,
        *,
        layer_prob: float = LAYER_PROB,
        depth_prob: float = DEPTH_PROB,
        embed_prob: float = EMBED_PROB,
    ) -> ArchConfig:
        """AutoFormer's mutation: depth (new layers drawn at random, extra ones dropped), then each
        layer's mlp ratio and heads with `layer_prob`, then the embedding width."""
        depth = arch.depth
        mlp = list(arch.mlp_ratios)
        heads = list(arch.num_heads)
        if rng.random() < depth_prob:
            depth = int(rng.choice(self.depth))
            grow = depth - len(mlp)
            if grow > 0:
                mlp += [float(v) for v in rng.choice(self.mlp_ratio, size=grow)]
                heads += [int(v) for v in rng.choice(self.num_heads, size=grow)]
            mlp, heads = mlp[:depth], heads[:depth]
        for i in range(depth):
            if rng.random() < layer_prob:
                mlp[i] = float(rng.choice(self.mlp_ratio))
        for i in range(depth):
            if rng.random() < layer_prob:
                heads[i] = int(rng.choice(self.num_heads))
        embed = arch.embed_dim
        if rng.random() < embed_prob:
            embed = int(rng.choice(self.embed_dim))
        patch = arch.patch_size
        if self.patch_sizes is not None and rng.random() < embed_prob:  # a global dimension, like the width
            patch = self._patch(rng)
        return ArchConfig(embed_dim=embed, depth=depth, mlp_ratios=tuple(mlp), num_heads=tuple(heads), patch_size=patch)

    def crossover(self, a: ArchConfig, b: ArchConfig, rng: np.random.Generator) -> ArchConfig:
        """Uniform crossover, gene by gene. AutoFormer only crosses parents of equal depth; for
        unequal depths the child takes one parent's depth and layers only that parent has."""
        depth = a.depth if a.depth == b.depth else int(rng.choice([a.depth, b.depth]))
        longer = a if a.depth >= b.depth else b

        def pick(x: Any, y: Any) -> Any:
            return x if rng.random() < 0.5 else y

        mlp, heads = [], []
        for i in range(depth):
            if i < min(a.depth, b.depth):
                mlp.append(pick(a.mlp_ratios[i], b.mlp_ratios[i]))
                heads.append(pick(a.num_heads[i], b.num_heads[i]))
            else:
                mlp.append(longer.mlp_ratios[i])
                heads.append(longer.num_heads[i])
        embed = pick(a.embed_dim, b.embed_dim)
        patch = pick(a.patch_size, b.patch_size) if self.patch_sizes is not None else a.patch_size
        return ArchConfig(embed_dim=embed, depth=depth, mlp_ratios=tuple(mlp), num_heads=tuple(heads), patch_size=patch)

    # -- ranges (searching the search space: vitnas.search.space_search) ----------------------------
    def ranges(self) -> dict[str, tuple[float, ...]]:
        """The searched dimensions' choices, by name."""
        return {
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "mlp_ratio": self.mlp_ratio,
            "num_heads": self.num_heads,
        }

    def with_ranges(self, ranges: Mapping[str, Sequence[float]]) -> SearchSpace:
        """This space with other choices for some dimensions (capacity unchanged)."""
        unknown = sorted(set(ranges) - set(self.ranges()))
        if unknown:
            raise ValueError(f"space {self.name!r} has no dimensions {unknown}; it has {list(self.ranges())}")
        return replace(self, **{k: tuple(v) for k, v in ranges.items()})

    def with_capacity(self, caps: Mapping[str, float]) -> SearchSpace:
        """This space with the supernet capacity `caps` (dimension -> largest value it must hold)."""
        return replace(self, **{f"max_{k}": v for k, v in caps.items()})

    def arch_values(self, arch: ArchConfig) -> dict[str, float]:
        """An arch's value of every dimension of `ranges()` (per-layer ones averaged)."""
        return {
            "embed_dim": float(arch.embed_dim),
            "depth": float(arch.depth),
            "mlp_ratio": float(np.mean(arch.mlp_ratios)),
            "num_heads": float(np.mean(arch.num_heads)),
        }

    # -- encodings (NSGA-II genomes, predictor features) --------------------------------------------
    def genome_upper(self) -> list[int]:
        """Largest value of each integer gene: depth, embed_dim, then mlp_ratio and num_heads for every
        possible layer (layers past the depth are ignored; a searched patch size keeps the default)."""
        D = max(self.depth)
        return (
            [len(self.depth) - 1, len(self.embed_dim) - 1]
            + [len(self.mlp_ratio) - 1] * D
            + [len(self.num_heads) - 1] * D
        )

    def from_genome(self, x: Any) -> ArchConfig:
        x = [int(round(float(v))) for v in x]
        depth, D = self.depth[x[0]], max(self.depth)
        return ArchConfig(
            self.embed_dim[x[1]],
            depth,
            tuple(self.mlp_ratio[i] for i in x[2 : 2 + depth]),
            tuple(self.num_heads[i] for i in x[2 + D : 2 + D + depth]),
        )

    def features(self, archs: Sequence[ArchConfig]) -> np.ndarray:
        """(N, F) predictor features: width, depth, patch size (when searched), each layer slot's MLP ratio
        and heads (0 past the arch's depth), then the mean MLP width and head count: all divided by the
        space's largest value, so every feature lies in [0, 1]."""
        D = max(self.depth)
        E, M, H = max(self.embed_dim), max(self.mlp_ratio), max(self.num_heads)
        rows = []
        for a in archs:
            mlp = [r / M for r in a.mlp_ratios] + [0.0] * (D - a.depth)
            heads = [h / H for h in a.num_heads] + [0.0] * (D - a.depth)
            head = [a.embed_dim / E, a.depth / D]
            if self.patch_sizes is not None:
                head.append((a.patch_size or 0) / max(self.patch_sizes))
            tail = [a.embed_dim * float(np.mean(a.mlp_ratios)) / (E * M), float(np.mean(a.num_heads)) / H]
            rows.append(head + mlp + heads + tail)
        return np.asarray(rows, dtype=float)

    # -- extremes and size -------------------------------------------------------------------------
    def smallest(self) -> ArchConfig:
        """The cheapest arch (with searched patch sizes: the largest patch, so the fewest tokens)."""
        d = min(self.depth)
        p = None if self.patch_sizes is None else max(self.patch_sizes)
        return ArchConfig(min(self.embed_dim), d, (min(self.mlp_ratio),) * d, (min(self.num_heads),) * d, p)

    def largest(self) -> ArchConfig:
        d = max(self.depth)
        p = None if self.patch_sizes is None else min(self.patch_sizes)
        return ArchConfig(max(self.embed_dim), d, (max(self.mlp_ratio),) * d, (max(self.num_heads),) * d, p)

    def size(self) -> int:
        """Number of distinct archs (exact integer)."""
        per_layer = len(self.mlp_ratio) * len(self.num_heads)
        patches = 1 if self.patch_sizes is None else len(self.patch_sizes)
        return patches * len(self.embed_dim) * sum(per_layer**d for d in self.depth)


def _space_keys() -> tuple[str, ...]:
    return tuple(f.name for f in fields(SearchSpace))


def _from_autoformer(data: Mapping, path: Path) -> dict[str, Any]:
    """`SearchSpace` keyword arguments from an AutoFormer supernet config: choices from its
    `SEARCH_SPACE` section, capacity from `SUPERNET` (absent: the largest choices)."""
    choices = check_autoformer(data, path, "SEARCH_SPACE", "an AutoFormer supernet config needs it")
    cap = data.get("SUPERNET", {})
    return dict(
        embed_dim=choices["EMBED_DIM"],
        depth=choices["DEPTH"],
        mlp_ratio=choices["MLP_RATIO"],
        num_heads=choices["NUM_HEADS"],
        max_embed_dim=cap.get("EMBED_DIM"),
        max_depth=cap.get("DEPTH"),
        max_mlp_ratio=cap.get("MLP_RATIO"),
        max_num_heads=cap.get("NUM_HEADS"),
        name=path.stem,
    )


_PRESETS = {name: SearchSpace(**kwargs) for name, kwargs in PRESETS.items()}
