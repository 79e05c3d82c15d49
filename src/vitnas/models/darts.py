"""Networks of the DARTS cell space built from a genotype (DARTS, P-DARTS, PC-DARTS, CDARTS).

State-dict keys follow the CDARTS reference's evaluation network (`lib/models/model_augment.py`:
`feature_extractor.*`, `nas_layers.{stage}.{cell}.{preproc0,preproc1,dag}.*`, `fc`, `aux_head`), so its
retrained checkpoints load with `strict=True`. The ops are shared with the search supernet
(`vitnas.supernet.darts`), where every edge holds all of them.

    model = vitnas.create_model("cdarts_cifar", num_classes=10)     # 3.86M parameters (+0.48M aux head)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from vitnas.models.registry import register_model
from vitnas.space.darts import Genotype, published_genotype

__all__ = ["OPS", "ConvHead", "DartsNet", "conv_head", "FactorizedReduce", "StdConv", "darts_stem", "stage_plan"]

log = logging.getLogger(__name__)


class StdConv(nn.Module):
    """ReLU - Conv - BN (keys `net.1`, `net.2` as the reference's `StdConv`)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm2d(c_out, affine=affine)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DilConv(StdConv):
    """ReLU - depthwise (dilated) conv - pointwise conv - BN."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, pad: int, dil: int, affine: bool = True) -> None:
        nn.Module.__init__(self)
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, k, stride, pad, dilation=dil, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(StdConv):
    """Two `DilConv`s of dilation 1, the first with the stride."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, pad: int, affine: bool = True) -> None:
        nn.Module.__init__(self)
        self.net = nn.Sequential(
            DilConv(c_in, c_in, k, stride, pad, 1, affine=affine), DilConv(c_in, c_out, k, 1, pad, 1, affine=affine)
        )


class Pool(nn.Module):
    """Max or average pooling (no BatchNorm: CDARTS's ops use `Pool`, not DARTS's `PoolBN`)."""

    def __init__(self, kind: str, stride: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, stride, 1) if kind == "max" else nn.AvgPool2d(3, stride, 1, count_include_pad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x)


class Zero(nn.Module):
    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return (x if self.stride == 1 else x[:, :, :: self.stride, :: self.stride]) * 0.0


class FactorizedReduce(nn.Module):
    """Halve the map with two offset stride-2 1x1 convs, concatenated."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        y = x[:, :, 1:, 1:]
        if y.shape[-1] != x.shape[-1] - 1 or x.shape[-1] % 2:  # odd maps: pad so both halves match
            y = nn.functional.pad(y, (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv1(x), self.conv2(y)], dim=1))


OPS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": lambda c, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda c, stride, affine: Pool("avg", stride),
    "max_pool_3x3": lambda c, stride, affine: Pool("max", stride),
    "skip_connect": lambda c, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine),
    "sep_conv_3x3": lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine),
    "sep_conv_5x5": lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine),
    "dil_conv_3x3": lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine),
}


class DropPath(nn.Module):
    """Zero a sample's op output with probability `p`, scaling the kept ones (`DartsNet.drop_path_prob` sets
    every edge's `p`, as the reference's `drop_path_prob(p)`)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p <= 0:
            return x
        keep = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def stage_plan(layers: tuple[int, ...], channels: int, stem_multiplier: int, n_nodes: int, layout: str) -> list:
    """Per cell: (stage, c_pp, c_p, c, reduction_prev, reduction) as the reference builds its stages (the
    last cell of every stage but the final one reduces and doubles the width)."""
    c_pp = c_p = channels * stem_multiplier
    c_cur, reduction_prev = channels, layout == "imagenet"
    plan = []
    for s, n in enumerate(layers):
        for i in range(n):
            reduction = i == n - 1 and s < len(layers) - 1
            if reduction:
                c_cur *= 2
            plan.append((s, c_pp, c_p, c_cur, reduction_prev, reduction))
            c_pp, c_p, reduction_prev = c_p, c_cur * n_nodes, reduction
    return plan


def darts_stem(layout: str, c: int) -> nn.ModuleList:
    """CIFAR: one 3x3 conv + BN (s0 = s1); ImageNet: two stride-4 / stride-2 stems (s0, s1)."""
    if layout == "cifar":
        return nn.ModuleList([nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))])
    stem0 = nn.Sequential(
        nn.Conv2d(3, c // 2, 3, 2, 1, bias=False),
        nn.BatchNorm2d(c // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(c // 2, c, 3, 2, 1, bias=False),
        nn.BatchNorm2d(c),
    )
    stem1 = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
    return nn.ModuleList([stem0, stem1])


def run_stem(stem: nn.ModuleList, x: Tensor) -> tuple[Tensor, Tensor]:
    s0 = stem[0](x)
    return (s0, s0) if len(stem) == 1 else (s0, stem[1](s0))


class Cell(nn.Module):
    """One cell of a genotype: preprocess both inputs to `c` channels, run each node's two ops, concat."""

    def __init__(self, genotype: Genotype, c_pp: int, c_p: int, c: int, reduction_prev: bool, reduction: bool) -> None:
        super().__init__()
        self.reduction = reduction
        self.preproc0 = FactorizedReduce(c_pp, c) if reduction_prev else StdConv(c_pp, c, 1, 1, 0)
        self.preproc1 = StdConv(c_p, c, 1, 1, 0)
        cell, self.concat = (
            (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal, genotype.normal_concat)
        )
        self.inputs = [[j for _, j in node] for node in cell]
        self.dag = nn.ModuleList()
        for node in cell:
            row = nn.ModuleList()
            for op_name, j in node:
                op = OPS[op_name](c, 2 if reduction and j < 2 else 1, True)
                row.append(op if isinstance(op, nn.Identity) else nn.Sequential(op, DropPath()))
            self.dag.append(row)

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = [self.preproc0(s0), self.preproc1(s1)]
        for row, inputs in zip(self.dag, self.inputs):
            states.append(sum(op(states[j]) for op, j in zip(row, inputs)))
        return torch.cat([states[i] for i in self.concat], dim=1)


class ConvHead(nn.Module):
    """The reference's small classifiers on a feature map, DARTS's auxiliary head and CDARTS's distillation
    heads: ReLU, average pool, 1x1 conv to 128, BN, ReLU, conv to 768, BN (unless `second_bn` is off), ReLU,
    global pool, linear."""

    def __init__(
        self,
        c: int,
        num_classes: int,
        *,
        pool: int,
        stride: int,
        conv_kernel: int,
        affine: bool = True,
        second_bn: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReLU(),
            nn.AvgPool2d(pool, stride=stride, padding=0, count_include_pad=False),
            nn.Conv2d(c, 128, 1, bias=False),
            nn.BatchNorm2d(128, affine=affine),
            nn.ReLU(),
            nn.Conv2d(128, 768, conv_kernel, bias=False),
        ]
        layers += [nn.BatchNorm2d(768, affine=affine), nn.ReLU()] if second_bn else [nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def conv_head(c: int, num_classes: int, map_size: int, *, pool: int, stride: int, **kw: Any) -> ConvHead:
    """A `ConvHead` for a `map_size` map: the pool and the 2x2 conv shrink to fit smaller maps than the
    reference's."""
    k = min(pool, map_size)
    return ConvHead(c, num_classes, pool=k, stride=stride, conv_kernel=min(2, (map_size - k) // stride + 1), **kw)


def aux_head(c: int, num_classes: int, layout: str, map_size: int) -> ConvHead:
    """The reference's auxiliary classifier (CIFAR: pool 5 stride 3 on an 8x8 map; ImageNet: stride 2 on
    7x7, without the second BatchNorm, as the reference's typo left it)."""
    cifar = layout == "cifar"
    return conv_head(c, num_classes, map_size, pool=5, stride=3 if cifar else 2, second_bn=cifar)


class DartsNet(nn.Module):
    """The network of one genotype: stem, `layers` cells per stage, global pool, linear classifier, and
    (while training, when `auxiliary`) an auxiliary head after the second-to-last stage whose logits the
    training task adds to the loss with weight `aux_weight` (`self.aux_logits` after a training forward)."""

    aux_weight = 0.4  # the reference's retraining weight of the auxiliary loss

    def __init__(
        self,
        genotype: Genotype | str | dict,
        *,
        channels: int = 36,
        layers: tuple[int, ...] = (7, 7, 6),
        layout: str = "cifar",
        num_classes: int = 10,
        auxiliary: bool = True,
        stem_multiplier: int = 3,
        n_nodes: int = 4,
        img_size: int = 32,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.genotype = _as_genotype(genotype)
        self.config = {
            "genotype": self.genotype.to_str(), "channels": channels, "layers": list(layers), "layout": layout,
            "num_classes": num_classes, "auxiliary": auxiliary, "stem_multiplier": stem_multiplier,
            "n_nodes": n_nodes, "img_size": img_size, "drop_path_rate": drop_path_rate,
        }  # fmt: skip
        self.num_classes, self.img_size = num_classes, img_size
        self.feature_extractor = darts_stem(layout, channels * stem_multiplier)
        plan = stage_plan(tuple(layers), channels, stem_multiplier, n_nodes, layout)
        self.nas_layers = nn.ModuleList(nn.ModuleList() for _ in layers)
        for s, c_pp, c_p, c, red_p, red in plan:
            cell = Cell(self.genotype, c_pp, c_p, c, red_p, red)
            self.nas_layers[s].append(cell)
        c_out = plan[-1][3] * n_nodes
        self.aux_stage = len(layers) - 2
        self.aux_head = None
        if auxiliary and len(layers) >= 2:
            c_aux = next(c * n_nodes for s, _, _, c, _, _ in reversed(plan) if s == self.aux_stage)
            stride = 4 if layout == "cifar" else 32
            self.aux_head = aux_head(c_aux, num_classes, layout, max(img_size // stride, 1))
        self.fc = nn.Linear(c_out, num_classes)
        self.aux_logits: Tensor | None = None
        self.drop_path_prob = drop_path_rate

    @property
    def drop_path_prob(self) -> float:
        return self._drop_path_prob

    @drop_path_prob.setter
    def drop_path_prob(self, p: float) -> None:
        self._drop_path_prob = float(p)
        for m in self.modules():
            if isinstance(m, DropPath):
                m.p = self._drop_path_prob

    @property
    def arch(self) -> Genotype:
        return self.genotype

    def forward_features(self, x: Tensor) -> Tensor:
        s0, s1 = run_stem(self.feature_extractor, x)
        self.aux_logits = None
        for s, stage in enumerate(self.nas_layers):
            for cell in stage:
                s0, s1 = s1, cell(s0, s1)
            if s == self.aux_stage and self.aux_head is not None and self.training:
                self.aux_logits = self.aux_head(s1)
        return s1

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _as_genotype(value: Genotype | str | dict) -> Genotype:
    if isinstance(value, Genotype):
        return value
    if isinstance(value, str):
        return Genotype.from_str(value)
    return Genotype.from_dict(value)


def num_params_without_aux(model: DartsNet) -> int:
    """Parameters of the deployed network (the auxiliary head only trains): what papers report."""
    aux = sum(p.numel() for p in model.aux_head.parameters()) if model.aux_head is not None else 0
    return sum(p.numel() for p in model.parameters()) - aux


def _darts(genotype: str, **defaults: Any) -> Callable[..., DartsNet]:
    def make(**kw: Any) -> DartsNet:
        return DartsNet(published_genotype(genotype), **{**defaults, **kw})

    return make


_CIFAR = {"channels": 36, "layers": (7, 7, 6), "layout": "cifar", "img_size": 32, "num_classes": 10}
_IMAGENET = {"channels": 48, "layers": (5, 5, 4), "layout": "imagenet", "img_size": 224, "num_classes": 1000}


@register_model
def cdarts_cifar(**kw: Any) -> DartsNet:
    """CDARTS's CIFAR cell (cells/cifar_genotype.json), 36 channels, 20 cells: 3.86M parameters."""
    return _darts("cdarts_cifar", **_CIFAR)(**kw)


@register_model
def cdarts_imagenet(**kw: Any) -> DartsNet:
    """CDARTS's ImageNet cell (cells/imagenet_genotype.json), 48 channels, 14 cells, the reference's stems."""
    return _darts("cdarts_imagenet", **_IMAGENET)(**kw)


@register_model
def darts_v2_cifar(**kw: Any) -> DartsNet:
    """DARTS (second order) CIFAR cell, 36 channels, 20 cells (DARTS paper: 3.3M)."""
    return _darts("darts_v2", **_CIFAR)(**kw)
