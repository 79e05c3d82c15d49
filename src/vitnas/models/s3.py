"""S3 / AutoFormerV2 (Chen et al., NeurIPS'21, "Searching the Search Space of Vision Transformer"): the
searched Swin-like models S3-T/S/B. Module, parameter and buffer names follow the reference
(microsoft/Cream, AutoFormerV2/model/SSS.py, class `SSSTransformer`) so its state dicts -- including the
persistent `relative_position_index` and `attn_mask` buffers it saves -- load with strict keys.
Registered as `s3_tiny`, `s3_small`, `s3_base`: the reference's S3-T/S/B (configs/S3-{T,S,B}.yaml,
checkpoints S3-{T,S,B}.pth), which its README also calls AutoFormerV2-T/S/B; it registers no names itself.

What the reference does, and this model with it:
- patch embed: Conv2d(in_chans, dim0, 4, stride 4) + LayerNorm (`patch_embed.proj`, `patch_embed.norm`);
- four stages of Swin blocks (pre-norm window attention + pre-norm GELU MLP, stochastic depth); blocks
  alternate unshifted / shifted (by window // 2) windows; a block whose window is not smaller than the
  smaller side of its map uses the whole map as one window (window clipped to that side) and no shift;
- attention: a fixed head dim of 32 (dim = 32 * heads in every S3 config), scale 32 ** -0.5, a learned
  relative position bias table ((2w-1)^2, heads) indexed by a persistent `relative_position_index` (w^2, w^2);
  shifted windows add the persistent `attn_mask` (nW, w^2, w^2) of 0 / -100 between cyclic-shift regions;
- patch merging after stages 1-3: concat the 2x2 neighbours [(0,0), (1,0), (0,1), (1,1)] (row, col) ->
  LayerNorm(4C) -> Linear(4C, C_next, bias=False);
- head: LayerNorm over tokens, mean over tokens, Linear;
- init: Linear weights trunc-normal(0.02) with zero bias, LayerNorm 1/0, bias tables trunc-normal(0.02),
  the patch conv PyTorch's default.

Beyond the reference (which asserts that every map is a multiple of its window): maps that are not
are shifted, then padded at the bottom/right; padded tokens form their own mask region (-100 to and
from every real token) and are cropped after attention, and odd maps are zero-padded before merging.
Maps that are multiples of their windows (all of them at 224 px) compute exactly what the reference does.
Absolute position embeddings (`ape`, broken in the reference for per-stage dims) are not supported.

Attention runs through `F.scaled_dot_product_attention` with the bias (+ mask) as an additive float mask;
windows and heads of one image are folded into SDPA's head axis so one mask broadcasts over the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.models.registry import register_model
from vitnas.nn.functional import drop_path
from vitnas.nn.layers import Mlp  # fc1, GELU, dropout, fc2, dropout: the reference's Mlp and keys
from vitnas.nn.windows import relative_position_index, shift_window_mask, window_partition_index

__all__ = ["S3Transformer", "relative_position_index", "shift_window_mask", "window_partition_index"]

log = logging.getLogger(__name__)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> tokens (B, H/p * W/p, dim): strided conv, then LayerNorm."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with a relative position bias; (B, nW, N, C) -> same shape."""

    def __init__(
        self, dim: int, window: int, num_heads: int, head_dim: int = 32, attn_drop: float = 0.0, drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim != num_heads * head_dim:
            # The reference projects to heads * 32 but reshapes by dim // heads, so it needs this too.
            raise ValueError(f"dim {dim} must equal num_heads {num_heads} * head_dim {head_dim}")
        self.dim, self.window, self.num_heads, self.head_dim = dim, window, num_heads, head_dim
        self.scale = head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, drop
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> Tensor:
        """(heads, N, N) bias gathered from the table."""
        N = self.window * self.window
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B, nW, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(B, nW, N, 3, h, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, d)
        bias = self.position_bias()
        if mask is None:  # one (h, N, N) bias broadcast over every window of every image
            q, k, v = qkv.reshape(3, B * nW, h, N, d).unbind(0)
            bias = bias.unsqueeze(0).contiguous()
        else:  # windows folded into heads: one (nW * h, N, N) bias + mask broadcast over images
            q, k, v = qkv.reshape(3, B, nW * h, N, d).unbind(0)
            bias = (mask.unsqueeze(1) + bias).reshape(1, nW * h, N, N)
        p = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p, scale=self.scale)
        out = out.view(B, nW, h, N, d).transpose(2, 3).reshape(B, nW, N, h * d)
        return F.dropout(self.proj(out), self.proj_drop, self.training)


class SwinTransformerBlock(nn.Module):
    """(B, H*W, C) -> same; (shifted) window attention and MLP, both pre-norm with residuals."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        drop_path_rate: float = 0.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        head_dim: int = 32,
    ) -> None:
        super().__init__()
        if min(resolution) <= window:  # as the reference: one window over the smaller side, no shift
            window, shift = min(resolution), 0
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must be in [0, window {window})")
        self.dim, self.resolution, self.window, self.shift = dim, resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, head_dim, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = drop_path_rate
        # Cyclic shift, padding and window partition as one gather and its inverse (not persistent).
        window_index, token_index = window_partition_index(resolution, window, shift)
        self.register_buffer("window_index", window_index, persistent=False)
        self.register_buffer("token_index", token_index, persistent=False)
        self.pad_tokens = window_index.numel() > resolution[0] * resolution[1]
        mask = shift_window_mask(resolution, window, shift)
        if mask is not None:  # the reference saves it (persistent) whenever it shifts
            self.register_buffer("attn_mask", mask)
        else:
            self.attn_mask: Tensor | None = None

    def _attention(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        if self.pad_tokens:
            x = F.pad(x, (0, 0, 0, 1))  # token L: the zero that padded window slots read
        x = x.index_select(1, self.window_index).view(B, -1, self.window**2, C)  # shift + pad + partition
        x = self.attn(x, self.attn_mask)
        return x.view(B, -1, C).index_select(1, self.token_index)  # merge + crop + shift back

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self._attention(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, ceil(H/2) * ceil(W/2), out_dim): 2x2 neighbours concatenated, LayerNorm, Linear."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        B, _, C = x.shape
        H, W = self.resolution
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        Hh, Wh = (H + 1) // 2, (W + 1) // 2
        # (B, Hh, row, Wh, col, C) -> channel groups ordered col-major: (0,0), (1,0), (0,1), (1,1)
        x = x.view(B, Hh, 2, Wh, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, Hh * Wh, 4 * C)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    def __init__(
        self,
        dim: int,
        out_dim: int | None,
        resolution: tuple[int, int],
        num_heads: Sequence[int],
        windows: Sequence[int],
        mlp_ratios: Sequence[float],
        dpr: Sequence[float],
        drop: float = 0.0,
        attn_drop: float = 0.0,
        head_dim: int = 32,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                resolution,
                num_heads[i],
                windows[i],
                0 if i % 2 == 0 else windows[i] // 2,
                mlp_ratios[i],
                dpr[i],
                drop,
                attn_drop,
                head_dim,
            )
            for i in range(len(dpr))
        )
        self.downsample = PatchMerging(resolution, dim, out_dim) if out_dim else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


def _per_block(value: Any, depth: int, what: str) -> list:
    """A stage's value for each block: a scalar repeats; a list gives one per block (extra entries ignored,
    as in the reference, whose S3-T config lists 8 values for a 6-block stage)."""
    if isinstance(value, (int, float)):
        return [value] * depth
    if len(value) < depth:
        raise ValueError(f"{what}: {len(value)} values for {depth} blocks")
    return list(value)[:depth]


class S3Transformer(nn.Module):
    """The reference `SSSTransformer`; per-stage `num_heads`, `window_sizes`, `mlp_ratios` take a scalar or
    one value per block (the reference configs list them per block)."""

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int | Sequence[int]] = (3, 6, 12, 24),
        window_sizes: Sequence[int | Sequence[int]] = (7, 7, 14, 7),
        mlp_ratios: Sequence[float | Sequence[float]] = (4.0, 4.0, 4.0, 4.0),
        head_dim: int = 32,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        n = len(depths)
        heads = [_per_block(num_heads[i], depths[i], "num_heads") for i in range(n)]
        windows = [_per_block(window_sizes[i], depths[i], "window_sizes") for i in range(n)]
        mlps = [_per_block(mlp_ratios[i], depths[i], "mlp_ratios") for i in range(n)]
        self.config: dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dims=list(embed_dims),
            depths=list(depths),
            num_heads=heads,
            window_sizes=windows,
            mlp_ratios=mlps,
            head_dim=head_dim,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_size)
        self.drop_rate = drop_rate
        self.patch_grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.layers = self._build_layers()
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        log.debug("S3Transformer: %s", self.config)

    def _build_layers(self) -> nn.ModuleList:
        """The stages `config` describes; stochastic depth rises over all blocks (the reference's linspace)."""
        c = self.config
        dims, depths = c["embed_dims"], c["depths"]
        dpr = torch.linspace(0, c["drop_path_rate"], sum(depths), device="cpu").tolist()
        H, W = self.patch_grid
        layers = nn.ModuleList()
        for i in range(len(depths)):
            layers.append(
                BasicLayer(
                    dims[i],
                    dims[i + 1] if i < len(depths) - 1 else None,
                    (H, W),
                    c["num_heads"][i],
                    c["window_sizes"][i],
                    c["mlp_ratios"][i],
                    dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    c["drop_rate"],
                    c["attn_drop_rate"],
                    c["head_dim"],
                )
            )
            H, W = (H + 1) // 2, (W + 1) // 2
        return layers

    def no_weight_decay_keywords(self) -> set[str]:
        """Swin's convention: the relative position bias tables are not decayed."""
        return {"relative_position_bias_table"}

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> normalised last-stage tokens (B, L, C)."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        x = F.dropout(self.patch_embed(x), self.drop_rate, self.training)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# -- registered variants ---------------------------------------------------------------------------
# S3 / AutoFormerV2-T/S/B (AutoFormerV2/configs/S3-{T,S,B}.yaml; the reference calls them S3-T/S/B and
# "AutoFormerV2-T/S/B", checkpoints S3-{T,S,B}.pth): dims 96/192/384/768, heads 3/6/12/24, MLP ratio 4.
S3 = {
    "tiny": ((2, 2, 6, 2), (7, 7, 14, 7)),
    "small": ((2, 2, 18, 2), (14, 14, 14, 14)),
    "base": ((2, 2, 30, 2), (7, 7, 14, 7)),
}


def _s3(size: str, **kw: Any) -> S3Transformer:
    depths, windows = S3[size]
    return S3Transformer(**{**dict(depths=depths, window_sizes=windows), **kw})


@register_model
def s3_tiny(**kw: Any) -> S3Transformer:
    return _s3("tiny", **kw)


@register_model
def s3_small(**kw: Any) -> S3Transformer:
    return _s3("small", **kw)


@register_model
def s3_base(**kw: Any) -> S3Transformer:
    return _s3("base", **kw)
