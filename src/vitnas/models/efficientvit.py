"""EfficientViT (Liu et al., CVPR'23): sandwich blocks with cascaded group attention, BN everywhere.

Module names follow the reference (microsoft/Cream, EfficientViT/classification) so its state dicts load
with strict keys. `model.fuse()` folds every BatchNorm into the preceding conv / following linear for
inference; fused and unfused models give the same outputs in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.models.registry import register_model
from vitnas.nn.convbn import BNLinear, Conv2dBN, fuse_batchnorms, offset_index
from vitnas.nn.functional import drop_path

__all__ = ["EfficientViT", "Conv2dBN", "BNLinear", "fuse_batchnorms"]


class Residual(nn.Module):
    """x + m(x); in training the branch is dropped per sample with probability `drop` (the reference's
    Residual(m, drop), which its builds leave at 0)."""

    def __init__(self, m: nn.Module, drop: float = 0.0) -> None:
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        return x + drop_path(self.m(x), self.drop, self.training)


class FFN(nn.Module):
    def __init__(self, ed: int, hidden: int) -> None:
        super().__init__()
        self.pw1 = Conv2dBN(ed, hidden)
        self.act = nn.ReLU()
        self.pw2 = Conv2dBN(hidden, ed, bn_weight_init=0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.pw2(self.act(self.pw1(x)))


class SqueezeExcite(nn.Module):
    """SE with a 1/4 squeeze (timm's SEModule as the reference uses it): keys fc1, fc2."""

    def __init__(self, channels: int, rd_ratio: float = 0.25, divisor: int = 8) -> None:
        super().__init__()
        v = channels * rd_ratio
        rd = max(divisor, int(v + divisor / 2) // divisor * divisor)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class PatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        hid = int(dim * 4)
        self.conv1 = Conv2dBN(dim, hid)
        self.act = nn.ReLU()
        self.conv2 = Conv2dBN(hid, hid, 3, 2, 1, groups=hid)
        self.se = SqueezeExcite(hid)
        self.conv3 = Conv2dBN(hid, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


class CascadedGroupAttention(nn.Module):
    """Each head attends over its own channel chunk plus the previous head's output; q gets a
    depthwise conv; a learned bias per head and |dy|, |dx| offset."""

    def __init__(
        self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: int, kernels: Sequence[int]
    ) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.scale = key_dim**-0.5
        self.d = int(attn_ratio * key_dim)
        self.qkvs = nn.ModuleList(Conv2dBN(dim // num_heads, 2 * key_dim + self.d) for _ in range(num_heads))
        self.dws = nn.ModuleList(
            Conv2dBN(key_dim, key_dim, kernels[i], 1, kernels[i] // 2, groups=key_dim) for i in range(num_heads)
        )
        self.proj = nn.Sequential(nn.ReLU(), Conv2dBN(self.d * num_heads, dim, bn_weight_init=0.0))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", offset_index(resolution))

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        bias = self.attention_biases[:, self.attention_bias_idxs]
        chunks = x.chunk(self.num_heads, dim=1)
        outs = []
        feat = chunks[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + chunks[i]
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.d], dim=1)
            q = dw(q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = ((q.transpose(-2, -1) @ k) * self.scale + bias[i]).softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).view(B, self.d, H, W)
            outs.append(feat)
        return self.proj(torch.cat(outs, 1))


class LocalWindowAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int,
        window_resolution: int,
        kernels: Sequence[int],
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.win = min(window_resolution, resolution)
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio, self.win, kernels)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        win = self.win
        if win >= H and win >= W:
            return self.attn(x)
        x = x.permute(0, 2, 3, 1)
        pad_b, pad_r = (win - H % win) % win, (win - W % win) % win
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pH, pW = H + pad_b, W + pad_r
        nH, nW = pH // win, pW // win
        x = x.view(B, nH, win, nW, win, C).transpose(2, 3).reshape(B * nH * nW, win, win, C).permute(0, 3, 1, 2)
        x = self.attn(x)
        x = x.permute(0, 2, 3, 1).view(B, nH, nW, win, win, C).transpose(2, 3).reshape(B, pH, pW, C)
        return x[:, :H, :W].permute(0, 3, 1, 2)


class EfficientViTBlock(nn.Module):
    """The sandwich: depthwise conv, FFN, attention, depthwise conv, FFN, each residual."""

    def __init__(
        self,
        ed: int,
        kd: int,
        nh: int,
        ar: float,
        resolution: int,
        window: int,
        kernels: Sequence[int],
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.dw0 = Residual(Conv2dBN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0.0), drop)
        self.ffn0 = Residual(FFN(ed, int(ed * 2)), drop)
        self.mixer = Residual(LocalWindowAttention(ed, kd, nh, ar, resolution, window, kernels), drop)
        self.dw1 = Residual(Conv2dBN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0.0), drop)
        self.ffn1 = Residual(FFN(ed, int(ed * 2)), drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


def _subsample_side(ed: int) -> nn.Sequential:
    return nn.Sequential(Residual(Conv2dBN(ed, ed, 3, 1, 1, groups=ed)), Residual(FFN(ed, int(ed * 2))))


class EfficientViT(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: Sequence[int] = (64, 128, 192),
        key_dim: Sequence[int] = (16, 16, 16),
        depth: Sequence[int] = (1, 2, 3),
        num_heads: Sequence[int] = (4, 4, 4),
        window_size: Sequence[int] = (7, 7, 7),
        kernels: Sequence[int] = (5, 5, 5, 5),
        drop_path_rate: float = 0.0,
    ) -> None:
        """`drop_path_rate`: per-sample drop of every residual branch in the blocks (0 as in the paper)."""
        super().__init__()
        self.config: dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=list(embed_dim),
            key_dim=list(key_dim),
            depth=list(depth),
            num_heads=list(num_heads),
            window_size=list(window_size),
            kernels=list(kernels),
            drop_path_rate=drop_path_rate,
        )
        self.num_classes = num_classes
        e0 = embed_dim[0]
        self.patch_embed = nn.Sequential(
            Conv2dBN(in_chans, e0 // 8, 3, 2, 1),
            nn.ReLU(),
            Conv2dBN(e0 // 8, e0 // 4, 3, 2, 1),
            nn.ReLU(),
            Conv2dBN(e0 // 4, e0 // 2, 3, 2, 1),
            nn.ReLU(),
            Conv2dBN(e0 // 2, e0, 3, 2, 1),
        )
        res = img_size // patch_size
        stages: list[list[nn.Module]] = [[], [], []]
        for i, (ed, kd, dpth, nh, win) in enumerate(zip(embed_dim, key_dim, depth, num_heads, window_size)):
            ar = ed / (kd * nh)
            for _ in range(dpth):
                stages[i].append(EfficientViTBlock(ed, kd, nh, ar, res, win, kernels, drop_path_rate))
            if i < len(embed_dim) - 1:  # subsample into the next stage
                stages[i + 1] += [_subsample_side(ed), PatchMerging(ed, embed_dim[i + 1])]
                res = (res - 1) // 2 + 1
                stages[i + 1].append(_subsample_side(embed_dim[i + 1]))
        self.blocks1, self.blocks2, self.blocks3 = (nn.Sequential(*s) for s in stages)
        self.head = BNLinear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay_keywords(self) -> set[str]:
        return {"attention_biases"}

    def forward_features(self, x: Tensor) -> Tensor:
        # channels-last maps: oneDNN's convolutions (85% of the time) run ~15% faster on them
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        return self.blocks3(self.blocks2(self.blocks1(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> EfficientViT:
        """Fold every BatchNorm into its conv / linear, in place (for inference); returns self."""
        fuse_batchnorms(self)
        return self.eval()


# -- registered variants ---------------------------------------------------------------------------
# EfficientViT M0-M5 (EfficientViT/classification/model/build.py): embed dims, depths, heads, kernels.
EFFICIENTVIT = {
    "m0": ((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5)),
    "m1": ((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3)),
    "m2": ((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3)),
    "m3": ((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5)),
    "m4": ((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3)),
    "m5": ((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3)),
}


def _efficientvit(variant: str, **kw: Any) -> EfficientViT:
    e, d, h, k = EFFICIENTVIT[variant]
    return EfficientViT(**{**dict(embed_dim=e, depth=d, num_heads=h, kernels=k), **kw})


@register_model
def efficientvit_m0(**kw: Any) -> EfficientViT:
    return _efficientvit("m0", **kw)


@register_model
def efficientvit_m1(**kw: Any) -> EfficientViT:
    return _efficientvit("m1", **kw)


@register_model
def efficientvit_m2(**kw: Any) -> EfficientViT:
    return _efficientvit("m2", **kw)


@register_model
def efficientvit_m3(**kw: Any) -> EfficientViT:
    return _efficientvit("m3", **kw)


@register_model
def efficientvit_m4(**kw: Any) -> EfficientViT:
    return _efficientvit("m4", **kw)


@register_model
def efficientvit_m5(**kw: Any) -> EfficientViT:
    return _efficientvit("m5", **kw)
