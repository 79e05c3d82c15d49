"""BatchNorm-carrying layers of the conv-heavy models (EfficientViT, TinyViT), their inference-time fusion,
and the |dy|, |dx| offset index their attention biases use.

Keys follow the references (microsoft/Cream): `Conv2dBN` holds `c`, `bn`; `BNLinear` holds `bn`, `l`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BNLinear", "Conv2dBN", "fuse_batchnorms", "offset_index"]


class Conv2dBN(nn.Sequential):
    """Conv (no bias) + BatchNorm, keys `c` and `bn`."""

    def __init__(
        self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1, bn_weight_init: float = 1.0
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c, bn = self.c, self.bn
        s = bn.weight / (bn.running_var + bn.eps).sqrt()
        conv = nn.Conv2d(
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups, device=c.weight.device
        )
        conv.weight.copy_(c.weight * s[:, None, None, None])
        conv.bias.copy_(bn.bias - bn.running_mean * s)
        return conv


class BNLinear(nn.Sequential):
    """BatchNorm1d + Linear, keys `bn` and `l`."""

    def __init__(self, a: int, b: int, std: float = 0.02) -> None:
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(a))
        self.add_module("l", nn.Linear(a, b))
        nn.init.trunc_normal_(self.l.weight, std=std)
        nn.init.zeros_(self.l.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn, lin = self.bn, self.l
        s = bn.weight / (bn.running_var + bn.eps).sqrt()
        shift = bn.bias - bn.running_mean * s
        out = nn.Linear(lin.in_features, lin.out_features, device=lin.weight.device)
        out.weight.copy_(lin.weight * s[None, :])
        out.bias.copy_(lin.weight @ shift + lin.bias)
        return out


def fuse_batchnorms(module: nn.Module) -> None:
    """Replace every `Conv2dBN` / `BNLinear` below `module` by its fused conv / linear, in place."""
    for name, child in module.named_children():
        if isinstance(child, (Conv2dBN, BNLinear)):
            setattr(module, name, child.fuse())
        else:
            fuse_batchnorms(child)


def offset_index(res: int) -> Tensor:
    """(res^2, res^2) bias index |dy| * res + |dx| between grid points in row-major order (the order in which
    the reference numbers its offsets)."""
    pos = torch.arange(res)
    y, x = pos.repeat_interleave(res), pos.repeat(res)
    return (y[:, None] - y[None, :]).abs() * res + (x[:, None] - x[None, :]).abs()
