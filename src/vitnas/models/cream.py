"""Cream's child networks (Peng et al., NeurIPS'20; microsoft/Cream `Cream/lib/models/structures/childnet.py`):
MobileNetV3-style stages of inverted residuals with squeeze-excite, Swish activations and a pooled head.

Module names follow the reference so its checkpoints load with strict keys: `conv_stem`, `bn1`, `blocks.0.0`
(depthwise-separable), `blocks.{1..5}.{j}` (inverted residuals: `conv_pw`, `bn1`, `conv_dw`, `bn2`,
`se.conv_reduce`, `se.conv_expand`, `conv_pwl`, `bn3`), `blocks.6.0` (`conv`, `bn1`), `conv_head` (with
bias, applied after global pooling as in the reference) and `classifier`. The block details are those of
the timm 0.1.20 blocks the reference imports: channels rounded to multiples of 8 (`make_divisible`), the
squeeze width computed on the expanded channels, ReLU inside and a hard-sigmoid gate, BatchNorm eps 1e-5 /
momentum 0.1, drop-path only on blocks with a residual (same width, stride 1).

A network is described by a plain JSON `config` (`cream_config`), so it builds on the meta device, and its
parameter and MAC counts are pure arithmetic over that config (`cream_params`, `cream_macs`): the supernet
reports costs without building anything, from the very plan (`block_specs`) the network is built from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.models.registry import register_model
from vitnas.nn.functional import drop_path
from vitnas.space.mbconv import CREAM_OPS

__all__ = [
    "CREAM_ARCHS",
    "BlockSpec",
    "CreamNet",
    "block_specs",
    "build_block",
    "cream_config",
    "cream_macs",
    "cream_params",
    "init_weights",
    "pooled_head",
    "reference_stages",
]

CREAM_CHANNELS = (24, 40, 80, 96, 192)
CREAM_STRIDES = (2, 2, 2, 1, 2)
# (kernel, expansion) of each searched stage's pool string in the reference's retrain script
# (ir_r1_k3_s2_e4_c24, k5_s2_e4_c40, k3_s2_e6_c80, k3_s1_e6_c96, k5_s2_e6_c192): what a 1-block stage keeps.
POOL_DEFAULTS = ((3, 4), (5, 4), (3, 6), (3, 6), (5, 6))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to a multiple of `divisor` (at least `divisor`), never more than 10% down: timm's rule."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class BlockSpec(NamedTuple):
    """One block of the plan: 'ds' (depthwise-separable), 'ir' (inverted residual) or 'cn' (conv-BN-act).
    `mid` is the depthwise width (the input width for 'ds'), `se` the squeeze width (0: no SE)."""

    kind: str
    cin: int
    cout: int
    kernel: int
    stride: int
    mid: int
    se: int
    drop_path: float = 0.0

    @property
    def residual(self) -> bool:
        return self.kind != "cn" and self.stride == 1 and self.cin == self.cout


def ds_spec(cin: int, cout: int, se_ratio: float, drop: float = 0.0) -> BlockSpec:
    se = make_divisible(cin * se_ratio) if se_ratio > 0 else 0
    return BlockSpec("ds", cin, cout, 3, 1, cin, se, drop)


def ir_spec(cin: int, cout: int, kernel: int, expansion: float, stride: int, se_ratio: float, drop: float) -> BlockSpec:
    mid = make_divisible(cin * expansion)
    se = make_divisible(mid * se_ratio) if se_ratio > 0 else 0  # timm's reduce_mid: on the expanded width
    return BlockSpec("ir", cin, cout, kernel, stride, mid, se, drop)


def cn_spec(cin: int, cout: int) -> BlockSpec:
    return BlockSpec("cn", cin, cout, 1, 1, cout, 0)


# -- config and plan -------------------------------------------------------------------------------
def cream_config(
    *,
    stages: Sequence[Sequence[Sequence[float]]],
    channels: Sequence[int] = CREAM_CHANNELS,
    strides: Sequence[int] = CREAM_STRIDES,
    img_size: int = 224,
    in_chans: int = 3,
    num_classes: int = 1000,
    stem_channels: int = 16,
    stage0_channels: int = 16,
    last_channels: int = 320,
    head_channels: int = 1280,
    se_ratio: float = 0.25,
    drop_rate: float = 0.0,
    drop_path_rate: float | Sequence[float] = 0.0,
) -> dict[str, Any]:
    """The checked, plain-JSON description of a network. `stages`: per searched stage, (kernel, expansion)
    per layer. `drop_path_rate`: a number (the reference's rule, rate * block index / block count over all
    blocks) or one rate per searched layer (what a supernet trained them with)."""
    stages = [[[int(k), int(e) if float(e).is_integer() else float(e)] for k, e in stage] for stage in stages]
    if not stages or any(not s for s in stages):
        raise ValueError(f"stages must hold at least one layer per stage, got {stages}")
    if not len(stages) == len(channels) == len(strides):
        raise ValueError(f"stages ({len(stages)}), channels ({len(channels)}) and strides ({len(strides)}) differ")
    n = sum(len(s) for s in stages)
    if isinstance(drop_path_rate, (int, float)):
        drop_path_rate = float(drop_path_rate)
    elif len(drop_path_rate) != n:
        raise ValueError(f"drop_path_rate has {len(drop_path_rate)} rates, the stages {n} layers")
    else:
        drop_path_rate = [float(r) for r in drop_path_rate]
    return dict(
        stages=stages,
        channels=[int(c) for c in channels],
        strides=[int(s) for s in strides],
        img_size=int(img_size),
        in_chans=int(in_chans),
        num_classes=int(num_classes),
        stem_channels=int(stem_channels),
        stage0_channels=int(stage0_channels),
        last_channels=int(last_channels),
        head_channels=int(head_channels),
        se_ratio=float(se_ratio),
        drop_rate=float(drop_rate),
        drop_path_rate=drop_path_rate,
    )


def block_specs(config: Mapping[str, Any]) -> list[list[BlockSpec]]:
    """The blocks of `blocks.0` .. `blocks.{n+1}`: stage 0, the searched stages, the last 1x1 conv."""
    stages, se = config["stages"], config["se_ratio"]
    n = sum(len(s) for s in stages)
    rate = config["drop_path_rate"]
    # the reference: rate * block_idx / block_count, counting stage 0 and the last conv (no drop-path there)
    rates = [rate * (i + 1) / (n + 2) for i in range(n)] if isinstance(rate, float) else list(rate)
    out = [[ds_spec(config["stem_channels"], config["stage0_channels"], se)]]
    cin, i = config["stage0_channels"], 0
    for stage, cout, stride in zip(stages, config["channels"], config["strides"]):
        blocks = []
        for j, (k, e) in enumerate(stage):
            blocks.append(ir_spec(cin, cout, k, e, stride if j == 0 else 1, se, rates[i]))
            cin, i = cout, i + 1
        out.append(blocks)
    out.append([cn_spec(cin, config["last_channels"])])
    return out


def _block_costs(b: BlockSpec, h: int, w: int) -> tuple[int, int, int, int]:
    """(params, MACs, output height, output width) of one block on an h x w map."""
    ho, wo = (h - 1) // b.stride + 1, (w - 1) // b.stride + 1
    bn = 2 * (b.cout + (b.mid if b.kind == "ds" else 2 * b.mid if b.kind == "ir" else 0))
    se_params = 2 * b.mid * b.se + b.se + b.mid if b.se else 0
    dw = b.mid * b.kernel**2
    if b.kind == "cn":
        return b.cin * b.cout + bn, ho * wo * b.cin * b.cout, ho, wo
    if b.kind == "ds":
        params = dw + b.cin * b.cout + se_params + bn
        return params, ho * wo * (dw + b.cin * b.cout) + 2 * b.mid * b.se, ho, wo
    params = b.cin * b.mid + dw + b.mid * b.cout + se_params + bn
    macs = h * w * b.cin * b.mid + ho * wo * (dw + b.mid * b.cout) + 2 * b.mid * b.se
    return params, macs, ho, wo


def _costs(config: Mapping[str, Any], img_size: int | None = None) -> tuple[int, int]:
    size = config["img_size"] if img_size is None else int(img_size)
    h = w = (size - 1) // 2 + 1  # the stem: 3x3, stride 2, padding 1
    stem, last, head = config["stem_channels"], config["last_channels"], config["head_channels"]
    nc = config["num_classes"]
    params = config["in_chans"] * stem * 9 + 2 * stem + last * head + head + (head * nc + nc if nc > 0 else 0)
    macs = h * w * config["in_chans"] * stem * 9 + last * head + (head * nc if nc > 0 else 0)
    for b in (b for stage in block_specs(config) for b in stage):
        p, m, h, w = _block_costs(b, h, w)
        params, macs = params + p, macs + m
    return params, macs


def cream_params(config: Mapping[str, Any]) -> int:
    """Exact parameter count of `CreamNet(**config)` (BatchNorm buffers aside), by arithmetic."""
    return _costs(config)[0]


def cream_macs(config: Mapping[str, Any], img_size: int | None = None) -> int:
    """Multiply-accumulates of one image, as `torch.utils.flop_counter` counts them: convolutions (with the
    squeeze-excite ones on the pooled 1x1 map) and the classifier; BatchNorm, activations, pooling, the SE
    gate and additions are not counted."""
    return _costs(config, img_size)[1]


# -- layers ----------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """A plain conv with the reference's symmetric padding (kernel // 2 for the odd kernels used here)."""
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)


class SqueezeExcite(nn.Module):
    """Channel gates from the pooled map: 1x1 reduce, ReLU, 1x1 expand, hard sigmoid (relu6(x + 3) / 6)."""

    def __init__(self, chs: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = _conv(chs, reduced, bias=True)
        self.conv_expand = _conv(reduced, chs, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = self.conv_expand(F.relu(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * (F.relu6(s + 3.0) / 6.0)  # hard sigmoid, written out: it has a second derivative (Cream look-ahead)


class DepthwiseSeparable(nn.Module):
    """Stage 0: depthwise conv, BN, Swish, SE, pointwise conv, BN (no activation), residual."""

    bn_pairs = (("conv_dw", "bn1"), ("conv_pw", "bn2"))

    def __init__(self, b: BlockSpec) -> None:
        super().__init__()
        self.conv_dw = _conv(b.cin, b.cin, b.kernel, b.stride, groups=b.cin)
        self.bn1 = nn.BatchNorm2d(b.cin)
        self.se = SqueezeExcite(b.cin, b.se) if b.se else None
        self.conv_pw = _conv(b.cin, b.cout)
        self.bn2 = nn.BatchNorm2d(b.cout)
        self.residual, self.drop_path = b.residual, b.drop_path

    def forward(self, x: Tensor) -> Tensor:
        y = F.silu(self.bn1(self.conv_dw(x)))
        if self.se is not None:
            y = self.se(y)
        y = self.bn2(self.conv_pw(y))
        return x + drop_path(y, self.drop_path, self.training) if self.residual else y


class InvertedResidual(nn.Module):
    """The searched op: pointwise expansion, depthwise k x k (stride on it), SE, linear projection."""

    bn_pairs = (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))

    def __init__(self, b: BlockSpec) -> None:
        super().__init__()
        self.conv_pw = _conv(b.cin, b.mid)
        self.bn1 = nn.BatchNorm2d(b.mid)
        self.conv_dw = _conv(b.mid, b.mid, b.kernel, b.stride, groups=b.mid)
        self.bn2 = nn.BatchNorm2d(b.mid)
        self.se = SqueezeExcite(b.mid, b.se) if b.se else None
        self.conv_pwl = _conv(b.mid, b.cout)
        self.bn3 = nn.BatchNorm2d(b.cout)
        self.residual, self.drop_path = b.residual, b.drop_path

    def forward(self, x: Tensor) -> Tensor:
        y = F.silu(self.bn1(self.conv_pw(x)))
        y = F.silu(self.bn2(self.conv_dw(y)))
        if self.se is not None:
            y = self.se(y)
        y = self.bn3(self.conv_pwl(y))
        return x + drop_path(y, self.drop_path, self.training) if self.residual else y


class ConvBnAct(nn.Module):
    """The last stage: 1x1 conv, BN, Swish."""

    bn_pairs = (("conv", "bn1"),)

    def __init__(self, b: BlockSpec) -> None:
        super().__init__()
        self.conv = _conv(b.cin, b.cout, b.kernel)
        self.bn1 = nn.BatchNorm2d(b.cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.bn1(self.conv(x)))


_BLOCKS = {"ds": DepthwiseSeparable, "ir": InvertedResidual, "cn": ConvBnAct}


def build_block(spec: BlockSpec) -> nn.Module:
    """The module of one plan entry (the static network's and the supernet's choice blocks alike)."""
    return _BLOCKS[spec.kind](spec)


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """The reference's init (timm's TF-style `init_weight_goog`): conv N(0, 2 / fan_out) with fan_out per
    group, BN weight 1 and bias 0, linear U(+-1 / sqrt(out_features)), biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(1.0)
            m.bias.zero_()
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            m.weight.uniform_(-bound, bound)
            m.bias.zero_()


@torch.no_grad()
def fold_batchnorm(module: nn.Module, conv_name: str, bn_name: str) -> None:
    """Replace `module.<conv_name>` by a biased conv computing conv + BN (eval statistics), and the BN by an
    identity, in place; a pair already folded is left alone."""
    conv, bn = getattr(module, conv_name), getattr(module, bn_name)
    if not isinstance(bn, nn.BatchNorm2d):
        return
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        groups=conv.groups,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    setattr(module, conv_name, fused)
    setattr(module, bn_name, nn.Identity())


def pooled_head(model: nn.Module, x: Tensor, pre_logits: bool = False) -> Tensor:
    """`model`'s head on a feature map: pool first, then the 1x1 `conv_head` and Swish (the reference's
    order, so the head runs on one pixel), dropout, `classifier`. Shared by the network and the supernet."""
    x = F.silu(model.conv_head(x.mean((2, 3), keepdim=True))).flatten(1)
    if pre_logits:
        return x
    if model.drop_rate and model.training:
        x = F.dropout(x, model.drop_rate, training=True)
    return model.classifier(x)


# -- the network -----------------------------------------------------------------------------------
class CreamNet(nn.Module):
    """A Cream child network: `CreamNet(**config)` with `cream_config`'s keywords; `config` holds them as
    plain JSON, so `CreamNet(**model.config)` rebuilds the same architecture."""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = cream_config(**config)
        self.config: dict[str, Any] = cfg
        self.img_size: int = cfg["img_size"]
        self.num_classes: int = cfg["num_classes"]
        self.drop_rate: float = cfg["drop_rate"]
        stem, head = cfg["stem_channels"], cfg["head_channels"]
        self.conv_stem = _conv(cfg["in_chans"], stem, 3, 2)
        self.bn1 = nn.BatchNorm2d(stem)
        self.blocks = nn.Sequential(*(nn.Sequential(*map(build_block, stage)) for stage in block_specs(cfg)))
        self.conv_head = _conv(cfg["last_channels"], head, bias=True)
        self.classifier = nn.Linear(head, self.num_classes) if self.num_classes > 0 else nn.Identity()
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> the last stage's map (B, last_channels, H/32, W/32)."""
        # channels-last maps: oneDNN's depthwise convs run about twice as fast on them (CPU)
        x = x.contiguous(memory_format=torch.channels_last)
        return self.blocks(F.silu(self.bn1(self.conv_stem(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return pooled_head(self, x, pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> CreamNet:
        """Fold every BatchNorm into its conv, in place (for inference); returns self, in eval mode."""
        fold_batchnorm(self, "conv_stem", "bn1")
        for block in self.blocks.modules():
            for conv, bn in getattr(block, "bn_pairs", ()):
                fold_batchnorm(block, conv, bn)
        return self.eval()


# -- registered variants ---------------------------------------------------------------------------
# The released models (Cream/tools/retrain.py): op choices of stages 1-5 (indices into CREAM_OPS) and the
# hard-coded input size.
CREAM_ARCHS: dict[int, tuple[tuple[tuple[int, ...], ...], int]] = {
    14: (((3,), (3, 3), (3, 3), (3,), (3,)), 64),
    43: (((3,), (3, 1), (3, 1), (3, 3, 3), (3, 3)), 96),
    114: (((3,), (3, 3), (3, 3), (3, 3, 3), (3, 3)), 160),
    287: (((3,), (3, 3), (3, 1, 3), (3, 3, 3, 3), (3, 3, 3)), 224),
    481: (((3, 4, 3, 1), (3, 2, 3, 0), (3, 3, 3, 1, 1), (3, 3, 3, 3), (3, 3, 3, 3)), 224),
    604: (((3, 3, 2, 3, 3), (3, 2, 3, 2, 3), (3, 2, 3, 2, 3), (3, 3, 2, 2, 3, 3), (3, 3, 2, 3, 3, 3)), 224),
}


def reference_stages(choices: Sequence[Sequence[int]]) -> list[list[list[int]]]:
    """(kernel, expansion) per layer as the reference builds its children: `gen_childnet` substitutes the
    choice into each stage's pool string only when the stage has more than one block, so a 1-block stage
    keeps the pool default whatever its choice ("[3]" is k3e4 in stage 1, k3e6 in stage 4, k5e6 in stage 5)."""
    return [
        [list(POOL_DEFAULTS[i])] if len(stage) == 1 else [list(CREAM_OPS[c]) for c in stage]
        for i, stage in enumerate(choices)
    ]


def _cream(flops: int, **kw: Any) -> CreamNet:
    """Defaults as the reference's retraining: its input size, 1000 classes, dropout 0.2 before the
    classifier, no drop-path."""
    choices, img_size = CREAM_ARCHS[flops]
    return CreamNet(**{**dict(stages=reference_stages(choices), img_size=img_size, drop_rate=0.2), **kw})


@register_model
def cream_14(**kw: Any) -> CreamNet:
    return _cream(14, **kw)


@register_model
def cream_43(**kw: Any) -> CreamNet:
    return _cream(43, **kw)


@register_model
def cream_114(**kw: Any) -> CreamNet:
    return _cream(114, **kw)


@register_model
def cream_287(**kw: Any) -> CreamNet:
    return _cream(287, **kw)


@register_model
def cream_481(**kw: Any) -> CreamNet:
    return _cream(481, **kw)


@register_model
def cream_604(**kw: Any) -> CreamNet:
    return _cream(604, **kw)
