"""Cream's MobileNet-style search space (NeurIPS'20, microsoft/Cream `Cream/`): an `MBConvArch` picks, for
every layer of every searched stage, one inverted-residual op (kernel, expansion); `MBConvSpace` holds the
legal values. Pure Python on purpose (no torch), like `ArchConfig` and `SearchSpace`, whose methods these
mirror so search strategies run on either unchanged.

The network around the searched stages is fixed (Cream's `gen_supernet`): a 3x3 stride-2 stem, a
depthwise-separable stage 0, the searched stages, a 1x1 conv to `last_channels`, global pooling, a 1x1
conv head and the classifier.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from vitnas.space.base import ArchIO, SpaceIO, as_int, as_number, as_tuple

__all__ = ["CREAM_OPS", "CREAM_PRE_PROB", "MBConvArch", "MBConvSpace"]

# Cream's op choices, in its index order: kernel_size [3, 5, 7] x exp_ratio [4, 6].
CREAM_OPS = ((3, 4), (3, 6), (5, 4), (5, 6), (7, 4), (7, 6))
# Cream's supernet sampling probabilities over CREAM_OPS (experiments/configs/train/train.yaml, PRE_PROB).
CREAM_PRE_PROB = (0.05, 0.2, 0.05, 0.5, 0.05, 0.15)

LAYER_PROB = 0.2  # each layer's op
DEPTH_PROB = 0.4  # one stage's depth


# -- the architecture ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MBConvArch(ArchIO):
    """One subnet: for each searched stage, the op index (into `MBConvSpace.ops`) of each of its layers.

    A stage's depth is the length of its tuple, at least 1 (the first layer changes width and stride).
    Instances are hashable and compare by value.
    """

    stages: tuple[tuple[int, ...], ...]
    kind: ClassVar[str] = "mbconv"

    def __post_init__(self) -> None:
        stages = as_tuple(self.stages, "stages")
        if not stages:
            raise ValueError("stages must hold at least one stage")
        out = []
        for i, stage in enumerate(stages):
            ops = as_tuple(stage, f"stages[{i}]")
            if not ops:
                raise ValueError(f"stages[{i}] is empty; every stage needs at least one layer")
            out.append(tuple(as_int(op, f"stages[{i}][{j}]", low=0) for j, op in enumerate(ops)))
        object.__setattr__(self, "stages", tuple(out))

    @property
    def depth(self) -> int:
        """Total searched layers (what strategies compare before crossing parents)."""
        return sum(len(s) for s in self.stages)

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.stages)

    def key(self) -> str:
        """A canonical string, equal for equal archs: stages split by '/', layers by ','."""
        return "/".join(",".join(str(op) for op in stage) for stage in self.stages)

    def __str__(self) -> str:
        return self.key()

    # -- serialization -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"stages": [list(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "arch") -> MBConvArch:
        """Build from {"stages": [[op, ...], ...]}; `source` names the file or object in error messages."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping with key 'stages', got {type(data).__name__}")
        unknown = sorted(set(data) - {"stages"})
        if unknown:
            raise ValueError(f"{source}: unknown key {unknown[0]!r}; expected keys ['stages']")
        if "stages" not in data:
            raise ValueError(f"{source}: missing key 'stages'")
        try:
            return cls(data["stages"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None


# -- the space -------------------------------------------------------------------------------------
def _ops(value: Any) -> tuple[tuple[int, int | float], ...]:
    ops = as_tuple(value, "ops")
    if not ops:
        raise ValueError("ops must hold at least one (kernel, expansion) pair")
    out = []
    for i, op in enumerate(ops):
        pair = as_tuple(op, f"ops[{i}]")
        if len(pair) != 2:
            raise ValueError(f"ops[{i}] must be a (kernel, expansion) pair, got {op!r}")
        k = as_int(pair[0], f"ops[{i}] kernel", low=1)
        if k % 2 == 0:
            raise ValueError(f"ops[{i}] kernel must be odd (symmetric padding), got {k}")
        out.append((k, as_number(pair[1], f"ops[{i}] expansion")))
    if len(set(out)) != len(out):
        raise ValueError(f"ops contain duplicates: {out}")
    return tuple(out)


def _depth_choices(value: Any, name: str) -> tuple[int, ...]:
    """One stage's allowed depths: a number or a list, sorted, each >= 1."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value,)
    choices = as_tuple(value, name)
    if not choices:
        raise ValueError(f"{name} must list at least one depth")
    out = tuple(sorted({as_int(d, f"{name} choices", low=1) for d in choices}))
    if len(out) != len(choices):
        raise ValueError(f"{name} contains duplicates: {list(choices)}")
    return out


def _probabilities(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    probs = as_tuple(value, "op_prob")
    if len(probs) != n:
        raise ValueError(f"op_prob has {len(probs)} entries, expected one per op ({n})")
    out = []
    for i, p in enumerate(probs):
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or p < 0:
            raise ValueError(f"op_prob[{i}] must be a non-negative number, got {p!r}")
        out.append(float(p))
    if abs(sum(out) - 1.0) > 1e-6:
        raise ValueError(f"op_prob must sum to 1, got {sum(out):g}")
    return tuple(out)


@dataclass(frozen=True)
class MBConvSpace(SpaceIO):
    """Ops, widths, strides and depths of the searched stages, plus the fixed parts of the network.

    Defaults are Cream's 0-600M-FLOPs space (`preset("cream")` adds its sampling probabilities).
    `max_depths` is the supernet's layer capacity per stage; it defaults to the largest depth choice and
    may exceed it (Cream's released supernet holds 5 layers in stage 3, the 5th never sampled).
    `op_prob` weighs the ops when sampling (None: uniform, SPOS' 'even').
    """

    arch_type: ClassVar[type] = MBConvArch
    kind_name: ClassVar[str] = "MBConv space"

    ops: tuple[tuple[int, int | float], ...] = CREAM_OPS
    channels: tuple[int, ...] = (24, 40, 80, 96, 192)
    strides: tuple[int, ...] = (2, 2, 2, 1, 2)
    depths: tuple[tuple[int, ...], ...] = ((1, 2, 3, 4),) * 5
    max_depths: tuple[int, ...] | None = None
    stem_channels: int = 16
    stage0_channels: int = 16
    last_channels: int = 320
    head_channels: int = 1280
    se_ratio: float = 0.25
    img_size: int = 224
    op_prob: tuple[float, ...] | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "ops", _ops(self.ops))
        channels = tuple(as_int(c, f"channels[{i}]", low=1) for i, c in enumerate(as_tuple(self.channels, "channels")))
        if not channels:
            raise ValueError("channels must name at least one searched stage")
        n = len(channels)
        strides = tuple(as_int(s, f"strides[{i}]", low=1) for i, s in enumerate(as_tuple(self.strides, "strides")))
        depths = tuple(_depth_choices(d, f"depths[{i}]") for i, d in enumerate(as_tuple(self.depths, "depths")))
        for name, value in (("strides", strides), ("depths", depths)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} stages, channels has {n}")
        if any(s not in (1, 2) for s in strides):
            raise ValueError(f"strides must be 1 or 2, got {list(strides)}")
        caps = tuple(max(d) for d in depths) if self.max_depths is None else as_tuple(self.max_depths, "max_depths")
        if len(caps) != n:
            raise ValueError(f"max_depths has {len(caps)} stages, channels has {n}")
        caps = tuple(as_int(c, f"max_depths[{i}]", low=1) for i, c in enumerate(caps))
        for i, (cap, choices) in enumerate(zip(caps, depths)):
            if cap < max(choices):
                raise ValueError(f"max_depths[{i}]={cap} is smaller than the largest depths[{i}] choice {max(choices)}")
        set_(self, "channels", channels)
        set_(self, "strides", strides)
        set_(self, "depths", depths)
        set_(self, "max_depths", caps)
        for name in ("stem_channels", "stage0_channels", "last_channels", "head_channels", "img_size"):
            set_(self, name, as_int(getattr(self, name), name, low=1))
        se = self.se_ratio
        if isinstance(se, bool) or not isinstance(se, numbers.Real) or not 0 <= se <= 1:
            raise ValueError(f"se_ratio must be a number in [0, 1] (0: no squeeze-excite), got {se!r}")
        set_(self, "se_ratio", float(se))
        set_(self, "op_prob", _probabilities(self.op_prob, len(self.ops)))

    @property
    def num_stages(self) -> int:
        return len(self.channels)

    # -- membership --------------------------------------------------------------------------------
    def _shape_violations(self, arch: Any) -> list[str]:
        if not isinstance(arch, MBConvArch):
            return [f"expected an MBConvArch, got {type(arch).__name__}"]
        if len(arch.stages) != self.num_stages:
            return [f"arch has {len(arch.stages)} stages, the space {self.num_stages}"]
        n = len(self.ops)
        return [
            f"stages[{i}][{j}]={op} is not an op index of this space (0..{n - 1})"
            for i, stage in enumerate(arch.stages)
            for j, op in enumerate(stage)
            if op >= n
        ]

    def violations(self, arch: MBConvArch) -> list[str]:
        """Every way `arch` leaves the choices, as messages naming stage, layer, value and choices."""
        out = self._shape_violations(arch)
        if not isinstance(arch, MBConvArch) or len(arch.stages) != self.num_stages:
            return out
        for i, (stage, choices) in enumerate(zip(arch.stages, self.depths)):
            if len(stage) not in choices:
                out.append(f"stages[{i}] has depth {len(stage)}, not one of the allowed choices {list(choices)}")
        return out

    def capacity_violations(self, arch: MBConvArch) -> list[str]:
        """Ways `arch` does not fit the supernet's layers (looser than `violations`: any depth up to
        `max_depths`)."""
        out = self._shape_violations(arch)
        if not isinstance(arch, MBConvArch) or len(arch.stages) != self.num_stages:
            return out
        for i, (stage, cap) in enumerate(zip(arch.stages, self.max_depths)):
            if len(stage) > cap:
                out.append(f"stages[{i}] has depth {len(stage)}, above the supernet's max_depths[{i}]={cap}")
        return out

    # -- sampling and evolution --------------------------------------------------------------------
    def _draw(self, rng: np.random.Generator, n: int) -> list[int]:
        """`n` op indices drawn with `op_prob` (uniform when None)."""
        return [int(v) for v in rng.choice(len(self.ops), size=n, p=self.op_prob)]

    def sample(self, rng: np.random.Generator) -> MBConvArch:
        """Each stage's depth uniformly from its choices, then each layer's op with `op_prob` (Cream draws
        `np.random.choice(6, n, p=PRE_PROB)` per stage)."""
        return MBConvArch(tuple(tuple(self._draw(rng, int(rng.choice(d)))) for d in self.depths))

    def mutate(
        self,
        arch: MBConvArch,
        rng: np.random.Generator,
        *,
        layer_prob: float = LAYER_PROB,
        depth_prob: float = DEPTH_PROB,
        **ignored: Any,
    ) -> MBConvArch:
        """With `depth_prob`, one random stage takes a new depth (new layers drawn as `sample` draws them,
        extra ones dropped); then each layer's op is redrawn with `layer_prob`. Keywords of other spaces
        (the ViT's `embed_prob`) are accepted and ignored, so strategies need not know the space."""
        stages = [list(s) for s in arch.stages]
        if rng.random() < depth_prob:
            i = int(rng.integers(len(stages)))
            depth = int(rng.choice(self.depths[i]))
            grow = depth - len(stages[i])
            if grow > 0:
                stages[i] += self._draw(rng, grow)
            stages[i] = stages[i][:depth]
        for stage in stages:
            for j in range(len(stage)):
                if rng.random() < layer_prob:
                    stage[j] = self._draw(rng, 1)[0]
        return MBConvArch(tuple(tuple(s) for s in stages))

    def crossover(self, a: MBConvArch, b: MBConvArch, rng: np.random.Generator) -> MBConvArch:
        """Uniform crossover, stage by stage: a stage of unequal depths takes one parent's depth, layers
        both parents have come from either, the rest from the longer parent."""
        stages = []
        for sa, sb in zip(a.stages, b.stages):
            depth = len(sa) if len(sa) == len(sb) else int(rng.choice([len(sa), len(sb)]))
            longer = sa if len(sa) >= len(sb) else sb
            stages.append(
                tuple(
                    (sa[j] if rng.random() < 0.5 else sb[j]) if j < min(len(sa), len(sb)) else longer[j]
                    for j in range(depth)
                )
            )
        return MBConvArch(tuple(stages))

    # -- encodings (NSGA-II genomes, predictor features) --------------------------------------------
    def genome_upper(self) -> list[int]:
        """Largest value of each integer gene: per stage its depth choice, then the op of each layer slot
        (slots past the depth are ignored)."""
        return [len(d) - 1 for d in self.depths] + [len(self.ops) - 1] * sum(max(d) for d in self.depths)

    def from_genome(self, x: Any) -> MBConvArch:
        x = [int(round(float(v))) for v in x]
        if len(x) != len(self.genome_upper()):
            raise ValueError(f"a genome of space {self.name!r} has {len(self.genome_upper())} genes, got {len(x)}")
        stages, slot = [], self.num_stages
        for i, choices in enumerate(self.depths):
            depth = choices[x[i]]
            stages.append(tuple(x[slot : slot + depth]))
            slot += max(choices)
        return MBConvArch(tuple(stages))

    def features(self, archs: Any) -> np.ndarray:
        """(N, F) predictor features in [0, 1]: each stage's depth, each layer slot's kernel and expansion
        (0 past the depth), then the mean kernel and expansion over the arch's layers."""
        K, E = max(k for k, _ in self.ops), max(e for _, e in self.ops)
        rows = []
        for a in archs:
            row, ks, es = [], [], []
            for stage, choices in zip(a.stages, self.depths):
                row.append(len(stage) / max(choices))
                for j in range(max(choices)):
                    k, e = self.ops[stage[j]] if j < len(stage) else (0, 0)
                    row += [k / K, e / E]
                    if j < len(stage):
                        ks.append(k / K)
                        es.append(e / E)
            rows.append(row + [float(np.mean(ks)), float(np.mean(es))])
        return np.asarray(rows, dtype=float)

    # -- extremes and size -------------------------------------------------------------------------
    def _op_by_cost(self) -> list[int]:
        """Op indices from cheapest to dearest: expansion first (it scales every conv), then kernel."""
        return sorted(range(len(self.ops)), key=lambda i: (self.ops[i][1], self.ops[i][0]))

    def smallest(self) -> MBConvArch:
        op = self._op_by_cost()[0]
        return MBConvArch(tuple((op,) * min(d) for d in self.depths))

    def largest(self) -> MBConvArch:
        op = self._op_by_cost()[-1]
        return MBConvArch(tuple((op,) * max(d) for d in self.depths))

    def size(self) -> int:
        """Number of distinct archs (exact integer)."""
        n = len(self.ops)
        return math.prod(sum(n**d for d in choices) for choices in self.depths)


_PRESETS: dict[str, MBConvSpace] = {
    # Cream's 0-600M FLOPs space (train.yaml, FLOPS_MAXIMUM 600): sta_num [4, 4, 4, 4, 4] at 224 px and
    # PRE_PROB sampling. The reference trains only at full depth; depths 1..4 let search pick shallower
    # stages, as its released children do.
    "cream": MBConvSpace(op_prob=CREAM_PRE_PROB, name="cream"),
    # 32 px CIFAR on 2 CPU cores: narrower stages, a smaller head, uniform sampling. Maps of 16 (stem), 8,
    # 4, 4, 2, 2 px: a stride-1 first stage (16 px) doubled the step time (batch 64, largest subnet
    # ~0.12 s vs ~0.055 s on 2 cores) for 2.4x the MACs.
    "cream-cifar": MBConvSpace(
        channels=(16, 24, 32, 48, 64),
        strides=(2, 2, 1, 2, 1),
        depths=((1, 2),) * 5,
        stem_channels=16,
        stage0_channels=16,
        last_channels=128,
        head_channels=256,
        img_size=32,
        name="cream-cifar",
    ),
}

MBConvSpace._presets = _PRESETS
