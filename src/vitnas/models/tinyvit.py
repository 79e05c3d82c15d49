"""TinyViT (Wu et al., ECCV'22): a conv stem and MBConv stage, then window-attention stages with a
depthwise conv between attention and MLP. Module names follow the reference (microsoft/Cream,
TinyViT/models/tiny_vit.py) so its state dicts load with strict keys.

CPU speed: feature maps stay channels-last throughout (tokens (B, L, C) are viewed as NCHW maps with
channels-last strides, so no transpose copies between the convs and the token ops), and `fuse()` folds
every BatchNorm into its conv for inference, as EfficientViT's does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.models.registry import register_model
from vitnas.nn.convbn import Conv2dBN, fuse_batchnorms, offset_index
from vitnas.nn.functional import drop_path

__all__ = ["TinyViT"]


def _in_place_ok(x: Tensor) -> bool:
    """No gradient to keep and no tracer watching: inference may overwrite temporaries."""
    return not (torch.is_grad_enabled() and x.requires_grad) and not torch.jit.is_tracing()


class GELU(nn.GELU):
    """nn.GELU (exact erf form) that overwrites its input when no gradient is needed. Its callers pass
    fresh temporaries, so inference skips allocating -- and page-faulting -- a new buffer for every large
    activation map, which costs more than the GELU itself on the CPU."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.aten.gelu_(x) if _in_place_ok(x) else F.gelu(x)


def _residual(x: Tensor, branch: Tensor, prob: float, training: bool) -> Tensor:
    """x + drop_path(branch), adding into the (fresh) branch tensor when nothing needs the original."""
    if training or not _in_place_ok(branch):
        return x + drop_path(branch, prob, training)
    return branch.add_(x)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_chans, dim // 2, 3, 2, 1), GELU(), Conv2dBN(dim // 2, dim, 3, 2, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    def __init__(self, dim: int, expand: float, drop_path_rate: float) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = Conv2dBN(dim, hidden)
        self.act1 = GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = GELU()
        self.conv3 = Conv2dBN(hidden, dim, bn_weight_init=0.0)
        self.act3 = GELU()
        self.drop_path = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.act3(_residual(x, y, self.drop_path, self.training))


def _tokens_to_map(x: Tensor, resolution: tuple[int, int]) -> Tensor:
    """Tokens (B, H*W, C) as an NCHW map with channels-last strides: a view, no copy."""
    H, W = resolution
    return x.view(x.shape[0], H, W, x.shape[-1]).permute(0, 3, 1, 2)


def _map_to_tokens(x: Tensor) -> Tensor:
    """An NCHW map as tokens (B, H*W, C); free when the map is channels-last."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class PatchMerging(nn.Module):
    """(B, C, H, W) or tokens -> tokens (B, H/2 * W/2, out_dim)."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = Conv2dBN(dim, out_dim)
        self.act = GELU()
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, 2, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            x = _tokens_to_map(x, self.resolution)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return _map_to_tokens(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Window attention with a LayerNorm inside; q/k/v laid out head by head; |dy|,|dx| biases."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.d = key_dim  # attn_ratio 1
        self.scale = key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.d))
        self.proj = nn.Linear(num_heads * self.d, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", offset_index(window), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(B, N, self.num_heads, -1)
        q, k, v = (t.permute(0, 2, 1, 3) for t in qkv.split([self.key_dim, self.key_dim, self.d], dim=3))
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, self.num_heads * self.d)
        return self.proj(out)


class TinyViTBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        window: int,
        mlp_ratio: float,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        self.resolution, self.window = resolution, window
        self.attn = Attention(dim, dim // num_heads, num_heads, window)
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_rate

    def _windows(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        H, W = self.resolution
        ws = self.window
        if ws == H and ws == W:
            return self.attn(x)
        x = x.view(B, H, W, C)
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pH, pW = H + pad_b, W + pad_r
        nH, nW = pH // ws, pW // ws
        x = x.view(B, nH, ws, nW, ws, C).transpose(2, 3).reshape(B * nH * nW, ws * ws, C)
        x = self.attn(x)
        x = x.view(B, nH, nW, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)
        return x[:, :H, :W].reshape(B, L, C)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        H, W = self.resolution
        x = _residual(x, self._windows(x), self.drop_path, self.training)
        x = _map_to_tokens(self.local_conv(_tokens_to_map(x, (H, W))))
        return _residual(x, self.mlp(x), self.drop_path, self.training)


class ConvLayer(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        expand: float,
        dpr: Sequence[float],
        resolution: tuple[int, int],
        out_dim: int | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand, dpr[i]) for i in range(depth))
        self.downsample = PatchMerging(resolution, dim, out_dim) if out_dim else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class BasicLayer(nn.Module):
    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        dpr: Sequence[float],
        out_dim: int | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, num_heads, window, mlp_ratio, dpr[i]) for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim, out_dim) if out_dim else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(
            img_size=img_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dims=list(embed_dims),
            depths=list(depths),
            num_heads=list(num_heads),
            window_sizes=list(window_sizes),
            mlp_ratio=mlp_ratio,
            mbconv_expand_ratio=mbconv_expand_ratio,
            drop_path_rate=drop_path_rate,
        )
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        res = img_size // 4
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        layers = []
        for i, depth in enumerate(depths):
            r = (res // 2**i, res // 2**i)
            rates = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            out = embed_dims[i + 1] if i < len(depths) - 1 else None
            if i == 0:
                layers.append(ConvLayer(embed_dims[0], depth, mbconv_expand_ratio, rates, r, out))
            else:
                layers.append(BasicLayer(embed_dims[i], r, depth, num_heads[i], window_sizes[i], mlp_ratio, rates, out))
        self.layers = nn.ModuleList(layers)
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"attention_biases"}

    def fuse(self) -> TinyViT:
        """Fold every BatchNorm into its conv, in place (for inference); returns self."""
        fuse_batchnorms(self)
        return self.eval()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return x  # tokens (B, L, C)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm_head(x.mean(1))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# -- registered variants ---------------------------------------------------------------------------
# TinyViT (TinyViT/models/tiny_vit.py): embed dims, heads, drop-path; depths 2,2,6,2; windows 7,7,14,7.
TINYVIT = {
    "5m": ((64, 128, 160, 320), (2, 4, 5, 10), 0.0),
    "11m": ((64, 128, 256, 448), (2, 4, 8, 14), 0.1),
    "21m": ((96, 192, 384, 576), (3, 6, 12, 18), 0.2),
}


def _tinyvit(
    variant: str, windows=(7, 7, 14, 7), img_size: int = 224, drop_path_rate: float | None = None, **kw: Any
) -> TinyViT:
    dims, heads, dpr = TINYVIT[variant]
    return TinyViT(
        embed_dims=dims,
        depths=(2, 2, 6, 2),
        num_heads=heads,
        window_sizes=windows,
        img_size=img_size,
        drop_path_rate=dpr if drop_path_rate is None else drop_path_rate,
        **kw,
    )


@register_model
def tiny_vit_5m_224(**kw: Any) -> TinyViT:
    return _tinyvit("5m", **kw)


@register_model
def tiny_vit_11m_224(**kw: Any) -> TinyViT:
    return _tinyvit("11m", **kw)


@register_model
def tiny_vit_21m_224(**kw: Any) -> TinyViT:
    return _tinyvit("21m", **kw)


@register_model
def tiny_vit_21m_384(**kw: Any) -> TinyViT:
    return _tinyvit("21m", windows=(12, 12, 24, 12), **{"img_size": 384, "drop_path_rate": 0.1, **kw})


@register_model
def tiny_vit_21m_512(**kw: Any) -> TinyViT:
    return _tinyvit("21m", windows=(16, 16, 32, 16), **{"img_size": 512, "drop_path_rate": 0.1, **kw})
