"""The S3 / AutoFormerV2 search space (Chen et al., NeurIPS'21, "Searching the Search Space of Vision
Transformer"): hierarchical Swin-like networks of stages, each searched in depth, embedding dim, MLP ratio,
q-k-v dim (as a head count, head_dim fixed) and window size. Pure Python on purpose (no torch), like
`SearchSpace` and `MBConvSpace`, whose methods these mirror so search strategies run on any of them.

Depth and embedding dim are chosen per stage (a stage's blocks must share a width for their residuals);
MLP ratio, heads and window are chosen per block, from that stage's choices, as AutoFormer chooses MLP
ratio and heads per layer and as the released S3 configs list them. A stage's q-k-v width
(heads * head_dim) may differ from its embedding dim. Windows at least as large as a stage's map act as one
window over the whole map, unshifted (the reference's rule), so such choices give equal networks.

The released code (microsoft/Cream `AutoFormerV2/`) holds only the searched S3-T/S/B models; the spaces
below are ours, built around them (see `_PRESETS`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from vitnas.space.base import ArchIO, SpaceIO, as_int, as_number, as_tuple
from vitnas.space.space import DEPTH_PROB, EMBED_PROB, LAYER_PROB
from vitnas.space.yaml_io import check_keys

__all__ = ["S3Arch", "S3Space", "BLOCK_DIMS"]

BLOCK_DIMS = ("mlp_ratios", "num_heads", "window_sizes")  # chosen per block; depths and embed_dims per stage
_ARCH_KEYS = ("depths", "embed_dims", *BLOCK_DIMS)


def _value(dim: str, value: Any, name: str) -> int | float:
    return as_number(value, name) if dim == "mlp_ratios" else as_int(value, name, low=1)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# -- the architecture ------------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Arch(ArchIO):
    """One subnet: per stage its depth and embedding dim, and per block of the stage its MLP ratio, head
    count (q-k-v width = heads * the space's head_dim) and window size.

    A per-block entry may be given as one number for the whole stage; it is stored per block. Instances
    are hashable and compare by value; the fields are `S3Transformer`'s config keys.
    """

    depths: tuple[int, ...]
    embed_dims: tuple[int, ...]
    mlp_ratios: tuple[tuple[int | float, ...], ...]
    num_heads: tuple[tuple[int, ...], ...]
    window_sizes: tuple[tuple[int, ...], ...]
    kind: ClassVar[str] = "s3"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        depths = tuple(as_int(d, f"depths[{i}]", low=1) for i, d in enumerate(as_tuple(self.depths, "depths")))
        if not depths:
            raise ValueError("depths must hold at least one stage")
        embeds = tuple(
            as_int(e, f"embed_dims[{i}]", low=1) for i, e in enumerate(as_tuple(self.embed_dims, "embed_dims"))
        )
        if len(embeds) != len(depths):
            raise ValueError(f"embed_dims has {len(embeds)} stages, depths has {len(depths)}")
        set_(self, "depths", depths)
        set_(self, "embed_dims", embeds)
        for dim in BLOCK_DIMS:
            stages = as_tuple(getattr(self, dim), dim)
            if len(stages) != len(depths):
                raise ValueError(f"{dim} has {len(stages)} stages, depths has {len(depths)}")
            out = []
            for i, (stage, depth) in enumerate(zip(stages, depths)):
                values = (stage,) * depth if _is_scalar(stage) else as_tuple(stage, f"{dim}[{i}]")
                if len(values) != depth:
                    raise ValueError(f"{dim}[{i}] has {len(values)} values for a stage of depth {depth}")
                out.append(tuple(_value(dim, v, f"{dim}[{i}][{j}]") for j, v in enumerate(values)))
            set_(self, dim, tuple(out))

    @property
    def depth(self) -> int:
        """Total blocks (what strategies compare before crossing parents)."""
        return sum(self.depths)

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def blocks(self, stage: int) -> list[tuple[int | float, int, int]]:
        """(mlp_ratio, num_heads, window_size) of each block of a stage."""
        return list(zip(self.mlp_ratios[stage], self.num_heads[stage], self.window_sizes[stage]))

    def key(self) -> str:
        """A canonical string, equal for equal archs: per stage `embed[mlp,heads,window;...]`, split by '/'."""
        return "/".join(
            f"{e}[" + ";".join(f"{m!r},{h},{w}" for m, h, w in self.blocks(i)) + "]"
            for i, e in enumerate(self.embed_dims)
        )

    def __str__(self) -> str:
        return self.key()

    # -- serialization -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: [list(v) if isinstance(v, tuple) else v for v in getattr(self, k)] for k in _ARCH_KEYS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "arch") -> S3Arch:
        """Build from the `to_dict` keys; `source` names the file or object in error messages."""
        check_keys(data, _ARCH_KEYS, source, required=_ARCH_KEYS)
        try:
            return cls(**{k: data[k] for k in _ARCH_KEYS})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_static_config(cls, config: Mapping[str, Any]) -> S3Arch:
        """The arch of an `S3Transformer` config (e.g. `create_model("s3_tiny").config`): per-stage values
        repeat over the stage's blocks and extra per-block entries are dropped, as the model does. Its
        head_dim must be the space's for the arch to mean the same network there."""
        depths = [int(d) for d in config["depths"]]

        def per_block(dim: str) -> list:
            return [v if _is_scalar(v) else list(v)[:d] for v, d in zip(config[dim], depths)]

        return cls(depths, config["embed_dims"], *(per_block(dim) for dim in BLOCK_DIMS))


# -- the space -------------------------------------------------------------------------------------
_DIMS = ("embed_dims", "depths", *BLOCK_DIMS)  # each a list of per-stage choice lists


def _stage_choices(dim: str, value: Any, name: str) -> tuple:
    """One stage's choices: a number or a list, sorted, without duplicates."""
    values = (value,) if _is_scalar(value) else as_tuple(value, name)
    if not values:
        raise ValueError(f"{name} must list at least one choice")
    out = tuple(sorted({_value(dim, v, f"{name} choices") for v in values}))
    if len(out) != len(values):
        raise ValueError(f"{name} contains duplicates: {list(values)}")
    return out


def _pick(rng: np.random.Generator, choices: tuple) -> Any:
    """One of `choices`, uniformly, as the Python value it is (not a numpy scalar)."""
    return choices[int(rng.integers(len(choices)))]


@dataclass(frozen=True)
class S3Space(SpaceIO):
    """Per-stage choices of every searched dimension, the supernet's capacity and the fixed parts.

    Each of `embed_dims`, `depths`, `mlp_ratios`, `num_heads`, `window_sizes` lists one entry per stage: a
    number (one choice) or a list of choices. `max_*` (one number per stage) is the supernet's capacity;
    it defaults to the largest choice and may exceed it. `head_dim` fixes the q-k-v width per head, as in
    the released models (32); `img_size` and `patch_size` are what a supernet on this space is built for.
    Defaults are the `s3-space` preset (wide enough for S3-T, S3-S and S3-B).
    """

    arch_type: ClassVar[type] = S3Arch
    kind_name: ClassVar[str] = "S3 space"

    embed_dims: tuple[tuple[int, ...], ...] = ((64, 96), (128, 192), (320, 384), (640, 768))
    depths: tuple[tuple[int, ...], ...] = ((1, 2), (1, 2), (6, 10, 14, 18, 22, 26, 30), (1, 2))
    mlp_ratios: tuple[tuple[int | float, ...], ...] = ((3, 3.5, 4),) * 4
    num_heads: tuple[tuple[int, ...], ...] = ((2, 3), (4, 5, 6), (10, 11, 12), (20, 22, 24))
    window_sizes: tuple[tuple[int, ...], ...] = ((7, 14),) * 4
    max_embed_dims: tuple[int, ...] | None = None
    max_depths: tuple[int, ...] | None = None
    max_mlp_ratios: tuple[int | float, ...] | None = None
    max_num_heads: tuple[int, ...] | None = None
    max_window_sizes: tuple[int, ...] | None = None
    head_dim: int = 32
    img_size: int = 224
    patch_size: int = 4
    name: str = "custom"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        n = len(as_tuple(self.embed_dims, "embed_dims"))
        if n == 0:
            raise ValueError("embed_dims must list at least one stage")
        for dim in _DIMS:
            stages = as_tuple(getattr(self, dim), dim)
            if len(stages) != n:
                raise ValueError(f"{dim} has {len(stages)} stages, embed_dims has {n}")
            choices = tuple(_stage_choices(dim, c, f"{dim}[{i}]") for i, c in enumerate(stages))
            set_(self, dim, choices)
            cap_name, cap = f"max_{dim}", getattr(self, f"max_{dim}")
            caps = tuple(max(c) for c in choices) if cap is None else as_tuple(cap, cap_name)
            if len(caps) != n:
                raise ValueError(f"{cap_name} has {len(caps)} stages, embed_dims has {n}")
            caps = tuple(_value(dim, c, f"{cap_name}[{i}]") for i, c in enumerate(caps))
            for i, (c, ch) in enumerate(zip(caps, choices)):
                if c < max(ch):
                    raise ValueError(f"{cap_name}[{i}]={c} is smaller than the largest {dim}[{i}] choice {max(ch)}")
            set_(self, cap_name, caps)
        for name in ("head_dim", "img_size", "patch_size"):
            set_(self, name, as_int(getattr(self, name), name, low=1))
        if self.patch_size > self.img_size:
            raise ValueError(f"patch_size {self.patch_size} is larger than img_size {self.img_size}")

    @property
    def num_stages(self) -> int:
        return len(self.embed_dims)

    def resolutions(self, img_size: int | None = None) -> list[tuple[int, int]]:
        """Each stage's token map at `img_size` (default: the space's): the patch grid, then halved
        (rounded up) by each patch merging."""
        side = (self.img_size if img_size is None else int(img_size)) // self.patch_size
        out = []
        for _ in range(self.num_stages):
            out.append((side, side))
            side = (side + 1) // 2
        return out

    # -- membership --------------------------------------------------------------------------------
    def _outside(self, arch: Any, allowed: Any) -> list[str]:
        """Messages for every value of `arch` that `allowed(dim, stage, value)` rejects (it returns the
        reason, or None), after the shape checks."""
        if not isinstance(arch, S3Arch):
            return [f"expected an S3Arch, got {type(arch).__name__}"]
        if arch.num_stages != self.num_stages:
            return [f"arch has {arch.num_stages} stages, the space {self.num_stages}"]
        out = []
        for i in range(self.num_stages):
            for dim in ("depths", "embed_dims"):
                why = allowed(dim, i, getattr(arch, dim)[i])
                if why:
                    out.append(f"{dim}[{i}]={getattr(arch, dim)[i]} {why}")
            for dim in BLOCK_DIMS:
                for j, v in enumerate(getattr(arch, dim)[i]):
                    why = allowed(dim, i, v)
                    if why:
                        out.append(f"{dim}[{i}][{j}]={v} {why}")
        return out

    def violations(self, arch: S3Arch) -> list[str]:
        """Every way `arch` leaves the choices, as messages naming the key, stage, block, value and choices."""

        def allowed(dim: str, i: int, v: Any) -> str | None:
            choices = getattr(self, dim)[i]
            return None if v in choices else f"is not one of the allowed choices {list(choices)}"

        return self._outside(arch, allowed)

    def capacity_violations(self, arch: S3Arch) -> list[str]:
        """Ways `arch` does not fit the supernet's weights (looser than `violations`: any value up to the
        stage's `max_*`)."""

        def allowed(dim: str, i: int, v: Any) -> str | None:
            cap = getattr(self, f"max_{dim}")[i]
            return None if v <= cap else f"is above the supernet's max_{dim}[{i}]={cap}"

        return self._outside(arch, allowed)

    # -- sampling and evolution --------------------------------------------------------------------
    def _block(self, rng: np.random.Generator, stage: int) -> tuple[Any, Any, Any]:
        return tuple(_pick(rng, getattr(self, dim)[stage]) for dim in BLOCK_DIMS)

    @staticmethod
    def _assemble(embeds: list[int], stages: list[list[tuple]]) -> S3Arch:
        """An arch from per-stage embedding dims and per-stage lists of (mlp, heads, window) blocks."""
        per_dim = [[tuple(b[k] for b in blocks) for blocks in stages] for k in range(len(BLOCK_DIMS))]
        return S3Arch(tuple(len(b) for b in stages), tuple(embeds), *per_dim)

    def sample(self, rng: np.random.Generator) -> S3Arch:
        """Per stage a depth and an embedding dim, then each block's MLP ratio, heads and window, all
        uniformly from the stage's choices."""
        embeds, stages = [], []
        for i in range(self.num_stages):
            depth = _pick(rng, self.depths[i])
            embeds.append(_pick(rng, self.embed_dims[i]))
            stages.append([self._block(rng, i) for _ in range(depth)])
        return self._assemble(embeds, stages)

    def mutate(
        self,
        arch: S3Arch,
        rng: np.random.Generator,
        *,
        layer_prob: float = LAYER_PROB,
        depth_prob: float = DEPTH_PROB,
        embed_prob: float = EMBED_PROB,
        **ignored: Any,
    ) -> S3Arch:
        """AutoFormer's mutation per stage: with `depth_prob` one random stage takes a new depth (new blocks
        drawn as `sample` draws them, extra ones dropped), with `embed_prob` one random stage a new
        embedding dim; then each block's MLP ratio, heads and window are each redrawn with `layer_prob`.
        Keywords of other spaces are accepted and ignored, so strategies need not know the space."""
        embeds = list(arch.embed_dims)
        stages = [[list(b) for b in arch.blocks(i)] for i in range(arch.num_stages)]
        if rng.random() < depth_prob:
            i = int(rng.integers(len(stages)))
            depth = _pick(rng, self.depths[i])
            stages[i] = (stages[i] + [list(self._block(rng, i)) for _ in range(depth - len(stages[i]))])[:depth]
        if rng.random() < embed_prob:
            i = int(rng.integers(len(stages)))
            embeds[i] = _pick(rng, self.embed_dims[i])
        for i, blocks in enumerate(stages):
            for block in blocks:
                for k, dim in enumerate(BLOCK_DIMS):
                    if rng.random() < layer_prob:
                        block[k] = _pick(rng, getattr(self, dim)[i])
        return self._assemble(embeds, [[tuple(b) for b in blocks] for blocks in stages])

    def crossover(self, a: S3Arch, b: S3Arch, rng: np.random.Generator) -> S3Arch:
        """Uniform crossover, stage by stage: the embedding dim from either parent; a stage of unequal
        depths takes one parent's depth; each value of a block both parents have comes from either, the
        other blocks from the longer parent."""
        embeds, stages = [], []
        for i in range(a.num_stages):
            ba, bb = a.blocks(i), b.blocks(i)
            embeds.append(a.embed_dims[i] if rng.random() < 0.5 else b.embed_dims[i])
            depth = len(ba) if len(ba) == len(bb) else (len(ba) if rng.random() < 0.5 else len(bb))
            longer = ba if len(ba) >= len(bb) else bb
            blocks = []
            for j in range(depth):
                if j < min(len(ba), len(bb)):
                    blocks.append(tuple(x if rng.random() < 0.5 else y for x, y in zip(ba[j], bb[j])))
                else:
                    blocks.append(longer[j])
            stages.append(blocks)
        return self._assemble(embeds, stages)

    # -- encodings (NSGA-II genomes, predictor features) --------------------------------------------
    # -- ranges (searching the search space: vitnas.search.space_search) ----------------------------
    def ranges(self) -> dict[str, tuple]:
        """Every stage's choices of every dimension, named `<dim>.<stage>` (e.g. `embed_dims.2`)."""
        return {f"{dim}.{i}": tuple(c) for dim in _DIMS for i, c in enumerate(getattr(self, dim))}

    def _per_stage(self, values: Mapping[str, Any], prefix: str, dims: Iterable[str]) -> dict[str, tuple]:
        unknown = sorted(set(values) - set(self.ranges()))
        if unknown:
            raise ValueError(f"space {self.name!r} has no dimensions {unknown}; it has e.g. embed_dims.0, depths.3")
        out = {}
        for dim in dims:
            current = getattr(self, f"{prefix}{dim}")
            out[f"{prefix}{dim}"] = tuple(values.get(f"{dim}.{i}", c) for i, c in enumerate(current))
        return out

    def with_ranges(self, ranges: Mapping[str, Sequence[Any]]) -> S3Space:
        """This space with other choices for some `<dim>.<stage>` dimensions (capacity unchanged)."""
        return replace(self, **self._per_stage({k: tuple(v) for k, v in ranges.items()}, "", _DIMS))

    def with_capacity(self, caps: Mapping[str, Any]) -> S3Space:
        """This space with the supernet capacity `caps` (`<dim>.<stage>` -> largest value it must hold)."""
        return replace(self, **self._per_stage(caps, "max_", _DIMS))

    def arch_values(self, arch: S3Arch) -> dict[str, float]:
        """An arch's value of every `ranges()` dimension (per-block ones averaged over the stage's blocks)."""
        out = {}
        for i in range(self.num_stages):
            out[f"embed_dims.{i}"] = float(arch.embed_dims[i])
            out[f"depths.{i}"] = float(arch.depths[i])
            for dim in ("mlp_ratios", "num_heads", "window_sizes"):
                out[f"{dim}.{i}"] = float(np.mean(getattr(arch, dim)[i]))
        return out

    def genome_upper(self) -> list[int]:
        """Largest value of each integer gene (an index into a choice list): every stage's depth, every
        stage's embedding dim, then per stage, for each block slot up to its largest depth, the MLP ratio,
        heads and window (slots past the depth are ignored)."""
        upper = [len(d) - 1 for d in self.depths] + [len(e) - 1 for e in self.embed_dims]
        for i in range(self.num_stages):
            upper += [len(getattr(self, dim)[i]) - 1 for dim in BLOCK_DIMS] * max(self.depths[i])
        return upper

    def from_genome(self, x: Any) -> S3Arch:
        x = [int(round(float(v))) for v in x]
        n = len(self.genome_upper())
        if len(x) != n:
            raise ValueError(f"a genome of space {self.name!r} has {n} genes, got {len(x)}")
        S, k = self.num_stages, len(BLOCK_DIMS)
        embeds, stages, slot = [], [], 2 * S
        for i in range(S):
            depth = self.depths[i][x[i]]
            embeds.append(self.embed_dims[i][x[S + i]])
            genes = x[slot : slot + k * depth]
            stages.append(
                [tuple(getattr(self, d)[i][genes[j * k + m]] for m, d in enumerate(BLOCK_DIMS)) for j in range(depth)]
            )
            slot += k * max(self.depths[i])
        return self._assemble(embeds, stages)

    def features(self, archs: Iterable[S3Arch]) -> np.ndarray:
        """(N, F) predictor features in [0, 1], each value over its stage's largest choice: per stage the
        depth and embedding dim, each block slot's MLP ratio, heads and window (0 past the depth), then
        per stage the mean MLP ratio, heads and window of its blocks."""
        rows = []
        for a in archs:
            head, slots, means = [], [], []
            for i in range(self.num_stages):
                head += [a.depths[i] / max(self.depths[i]), a.embed_dims[i] / max(self.embed_dims[i])]
                tops = [max(getattr(self, dim)[i]) for dim in BLOCK_DIMS]
                blocks = [[v / t for v, t in zip(b, tops)] for b in a.blocks(i)]
                for j in range(max(self.depths[i])):
                    slots += blocks[j] if j < len(blocks) else [0.0] * len(tops)
                means += [float(np.mean(col)) for col in zip(*blocks)]
            rows.append(head + slots + means)
        return np.asarray(rows, dtype=float)

    # -- extremes and size -------------------------------------------------------------------------
    def _extreme(self, pick: Any) -> S3Arch:
        embeds = [pick(e) for e in self.embed_dims]
        stages = [
            [tuple(pick(getattr(self, dim)[i]) for dim in BLOCK_DIMS)] * pick(self.depths[i])
            for i in range(self.num_stages)
        ]
        return self._assemble(embeds, stages)

    def smallest(self) -> S3Arch:
        """Every choice at its smallest (the cheapest arch but for windows: a smaller window that does not
        divide the map pads it, which can cost more attention MACs)."""
        return self._extreme(min)

    def largest(self) -> S3Arch:
        return self._extreme(max)

    def size(self) -> int:
        """Number of distinct archs (exact integer); windows at least as large as a map count apart even
        though they give the same network."""
        total = 1
        for i in range(self.num_stages):
            per_block = math.prod(len(getattr(self, dim)[i]) for dim in BLOCK_DIMS)
            total *= len(self.embed_dims[i]) * sum(per_block**d for d in self.depths[i])
        return total


_PRESETS: dict[str, S3Space] = {
    # Around S3-T (dims 96/192/384/768, heads 3/6/12/24, MLP 4, depths 2/2/6/2, windows 7/7/14/7) at 224 px:
    # narrower and shallower choices next to each of its values; windows 7 or 14 where the map (56, 28, 14)
    # allows both, 7 on the last 7x7 map.
    "s3-tiny-space": S3Space(
        embed_dims=((64, 96), (128, 192), (320, 384), (640, 768)),
        depths=((1, 2), (1, 2), (4, 6, 8), (1, 2)),
        mlp_ratios=((3.5, 4),) * 4,
        num_heads=((2, 3), (4, 6), (10, 12), (20, 24)),
        window_sizes=((7, 14), (7, 14), (7, 14), (7,)),
        name="s3-tiny-space",
    ),
    # S3-T, S3-S (depth 18, window 14 everywhere, clipped to 7 on the last map) and S3-B (depth 30): the
    # class defaults. Its supernet is S3-B's size (71.14M parameters at 1000 classes and 224 px; S3-B 71.13M).
    "s3-space": S3Space(name="s3-space"),
    # 32 px CIFAR on 2 CPU cores: patch 2, so the four stages see 16, 8, 4 and 2 px maps; head_dim 16 so
    # that narrow stages still have several heads; windows that tile the maps (8 and 4 cover the whole
    # map in stages 2 and 3, as the reference clips them: one window, no shift).
    "s3-cifar": S3Space(
        embed_dims=((16, 24), (32, 48), (64, 96), (128, 160)),
        depths=((1, 2), (1, 2), (1, 2, 3), (1, 2)),
        mlp_ratios=((2, 3),) * 4,
        num_heads=((1, 2), (2, 3), (4, 6), (8, 10)),
        window_sizes=((4, 8), (4, 8), (2, 4), (2,)),
        head_dim=16,
        img_size=32,
        patch_size=2,
        name="s3-cifar",
    ),
}

S3Space._presets = _PRESETS
