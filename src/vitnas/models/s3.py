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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.models.registry import register_model
from vitnas.nn.functional import drop_path
from vitnas.nn.layers import Mlp  # fc1, GELU, dropout, fc2, dropout: the reference's Mlp and keys
from vitnas.nn.windows import relative_position_index, shift_window_mask, window_partition_index

__all__ = [
    "S3Transformer",
    "block_shift",
    "effective_window",
    "gather_position_bias",
    "in_windows",
    "merge_neighbours",
    "relative_position_index",
    "s3_macs",
    "s3_params",
    "set_window_buffers",
    "shift_window_mask",
    "window_attention",
    "window_partition_index",
]

log = logging.getLogger(__name__)


# -- functional pieces: the static layers call them with their own weights and the supernet
# (`vitnas.supernet.s3`) with the active slices of its largest ones, so the two compute the same thing.
def block_shift(index: int, window: int) -> int:
    """Blocks alternate unshifted / shifted windows, by half a window."""
    return 0 if index % 2 == 0 else window // 2


def effective_window(resolution: tuple[int, int], window: int, shift: int) -> tuple[int, int]:
    """(window, shift) a block really uses: as the reference, a window not smaller than the map's smaller
    side becomes that side, unshifted."""
    if min(resolution) <= window:
        return min(resolution), 0
    return window, shift


def gather_position_bias(table: Tensor, index: Tensor) -> Tensor:
    """(heads, N, N) bias: the rows of a ((2w-1)^2, heads) table that an (N, N) relative-position index picks."""
    N = index.shape[0]
    return table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)


def window_attention(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    bias: Tensor,
    mask: Tensor | None,
    *,
    num_heads: int,
    head_dim: int,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    """(B, nW, N, C) -> (B, nW, N, C'): qkv rows are [q; k; v], each (num_heads, head_dim); `bias` is the
    (heads, N, N) relative position bias and `mask` the (nW, N, N) shift mask or None."""
    B, nW, N, _ = x.shape
    h, d = num_heads, head_dim
    qkv = F.linear(x, qkv_weight, qkv_bias).view(B, nW, N, 3, h, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, d)
    if mask is None:  # one (h, N, N) bias broadcast over every window of every image
        q, k, v = qkv.reshape(3, B * nW, h, N, d).unbind(0)
        bias = bias.unsqueeze(0).contiguous()
    else:  # windows folded into heads: one (nW * h, N, N) bias + mask broadcast over images
        q, k, v = qkv.reshape(3, B, nW * h, N, d).unbind(0)
        bias = (mask.unsqueeze(1) + bias).reshape(1, nW * h, N, N)
    p = attn_drop if training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p, scale=head_dim**-0.5)
    out = out.view(B, nW, h, N, d).transpose(2, 3).reshape(B, nW, N, h * d)
    return F.dropout(F.linear(out, proj_weight, proj_bias), proj_drop, training)


def in_windows(
    x: Tensor, fn: Callable[[Tensor], Tensor], window: int, window_index: Tensor, token_index: Tensor
) -> Tensor:
    """`fn` over the (B, nW, w^2, C) windows of (B, L, C) tokens: shift + pad + partition as one gather
    (`window_partition_index`), then merge + crop + shift back as another."""
    B, L, C = x.shape
    if window_index.numel() > L:
        x = F.pad(x, (0, 0, 0, 1))  # token L: the zero that padded window slots read
    x = fn(x.index_select(1, window_index).view(B, -1, window * window, C))
    return x.view(B, -1, x.shape[-1]).index_select(1, token_index)


def merge_neighbours(x: Tensor, resolution: tuple[int, int]) -> Tensor:
    """(B, H*W, C) -> (B, ceil(H/2) * ceil(W/2), 4C): each 2x2 neighbourhood's tokens concatenated in the
    reference's order (0,0), (1,0), (0,1), (1,1) (row, col); odd maps are zero-padded first."""
    B, _, C = x.shape
    H, W = resolution
    x = x.view(B, H, W, C)
    if H % 2 or W % 2:
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    Hh, Wh = (H + 1) // 2, (W + 1) // 2
    # (B, Hh, row, Wh, col, C) -> channel groups ordered col-major: (0,0), (1,0), (0,1), (1,1)
    return x.view(B, Hh, 2, Wh, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, Hh * Wh, 4 * C)


def set_window_buffers(model: nn.Module) -> nn.Module:
    """Recompute every block's window gathers (not persistent, so state dicts do not carry them) on the
    device of its weights: what a model built on the meta device and then loaded needs."""
    for m in model.modules():
        if isinstance(m, SwinTransformerBlock):
            device = m.norm1.weight.device
            window_index, token_index = window_partition_index(m.resolution, m.window, m.shift)
            m.window_index, m.token_index = window_index.to(device), token_index.to(device)
    return model


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
        self,
        dim: int,
        window: int,
        num_heads: int,
        head_dim: int = 32,
        attn_drop: float = 0.0,
        drop: float = 0.0,
        decouple_qkv: bool = False,
    ) -> None:
        super().__init__()
        if dim != num_heads * head_dim and not decouple_qkv:
            # The reference projects to heads * 32 but reshapes by dim // heads, so it needs this too; S3's
            # search space does not (its q-k-v width is searched apart from the embedding dim).
            raise ValueError(
                f"dim {dim} must equal num_heads {num_heads} * head_dim {head_dim} (or set decouple_qkv=True)"
            )
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
        return gather_position_bias(self.relative_position_bias_table, self.relative_position_index)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return window_attention(
            x,
            self.qkv.weight,
            self.qkv.bias,
            self.proj.weight,
            self.proj.bias,
            self.position_bias(),
            mask,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            attn_drop=self.attn_drop,
            proj_drop=self.proj_drop,
            training=self.training,
        )


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
        decouple_qkv: bool = False,
    ) -> None:
        super().__init__()
        window, shift = effective_window(resolution, window, shift)
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must be in [0, window {window})")
        self.dim, self.resolution, self.window, self.shift = dim, resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, head_dim, attn_drop, drop, decouple_qkv)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = drop_path_rate
        # Cyclic shift, padding and window partition as one gather and its inverse (not persistent).
        window_index, token_index = window_partition_index(resolution, window, shift)
        self.register_buffer("window_index", window_index, persistent=False)
        self.register_buffer("token_index", token_index, persistent=False)
        mask = shift_window_mask(resolution, window, shift)
        if mask is not None:  # the reference saves it (persistent) whenever it shifts
            self.register_buffer("attn_mask", mask)
        else:
            self.attn_mask: Tensor | None = None

    def _attention(self, x: Tensor) -> Tensor:
        return in_windows(x, lambda w: self.attn(w, self.attn_mask), self.window, self.window_index, self.token_index)

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
        return self.reduction(self.norm(merge_neighbours(x, self.resolution)))


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
        decouple_qkv: bool = False,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                resolution,
                num_heads[i],
                windows[i],
                block_shift(i, windows[i]),
                mlp_ratios[i],
                dpr[i],
                drop,
                attn_drop,
                head_dim,
                decouple_qkv,
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
    one value per block (the reference configs list them per block).

    Two options the reference lacks, for subnets extracted from S3's supernet (`vitnas.supernet.s3`):
    `decouple_qkv` lets the q-k-v width (num_heads * head_dim) differ from the stage's embedding dim, and
    `drop_path_rate` may list one rate per block (the rates the block trained with in the supernet)
    instead of the top of a linear ramp.
    """

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
        drop_path_rate: float | Sequence[float] = 0.1,
        decouple_qkv: bool = False,
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
            drop_path_rate=drop_path_rate if isinstance(drop_path_rate, (int, float)) else list(drop_path_rate),
            decouple_qkv=decouple_qkv,
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
        rate, n = c["drop_path_rate"], sum(depths)
        dpr = torch.linspace(0, rate, n, device="cpu").tolist() if isinstance(rate, (int, float)) else rate
        if len(dpr) != n:
            raise ValueError(f"drop_path_rate lists {len(dpr)} rates for {n} blocks")
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
                    c["decouple_qkv"],
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


# -- analytic costs ----------------------------------------------------------------------------------
def _stages(config: Mapping[str, Any]) -> list[tuple[int, tuple[int, int], list[tuple[int, int, float]]]]:
    """Per stage of `S3Transformer(**config)`: (dim, token map, [(heads, window, mlp_ratio) per block])."""
    img = config.get("img_size", 224)
    H, W = (img, img) if isinstance(img, int) else tuple(img)
    p, depths = config.get("patch_size", 4), config["depths"]
    H, W = H // p, W // p
    out = []
    for i, depth in enumerate(depths):
        per = [_per_block(config[k][i], depth, k) for k in ("num_heads", "window_sizes", "mlp_ratios")]
        out.append((config["embed_dims"][i], (H, W), list(zip(*per))))
        H, W = (H + 1) // 2, (W + 1) // 2
    return out


def s3_params(config: Mapping[str, Any]) -> int:
    """Parameters of `S3Transformer(**config)`, by arithmetic (buffers not counted)."""
    d, stages = config.get("head_dim", 32), _stages(config)
    c0, p = config["embed_dims"][0], config.get("patch_size", 4)
    n = config.get("in_chans", 3) * c0 * p * p + 3 * c0  # patch conv + its bias + LayerNorm
    for s, (c, res, blocks) in enumerate(stages):
        for heads, window, ratio in blocks:
            w, q, m = effective_window(res, window, 0)[0], heads * d, int(c * ratio)
            n += 4 * c + (2 * w - 1) ** 2 * heads + (c + 1) * 3 * q + (q + 1) * c + (c + 1) * m + (m + 1) * c
        if s < len(stages) - 1:
            n += 8 * c + 4 * c * stages[s + 1][0]  # merging LayerNorm(4C) + Linear(4C, C', no bias)
    c, classes = stages[-1][0], config.get("num_classes", 1000)
    return n + 2 * c + ((c + 1) * classes if classes > 0 else 0)


def s3_macs(config: Mapping[str, Any], img_size: int | None = None) -> int:
    """Multiply-accumulates of one image through `S3Transformer(**config)` at `img_size` (default: the
    config's), by arithmetic: what `torch.utils.flop_counter` counts (convs, linears, attention matmuls)
    halved. q-k-v, attention and the output projection also run on the padded slots of windows that do not
    tile their map."""
    if img_size is not None:
        config = {**config, "img_size": img_size}
    d, stages = config.get("head_dim", 32), _stages(config)
    c0, p = config["embed_dims"][0], config.get("patch_size", 4)
    H, W = stages[0][1]
    macs = config.get("in_chans", 3) * c0 * p * p * H * W
    for s, (c, (H, W), blocks) in enumerate(stages):
        for heads, window, ratio in blocks:
            w, q, m = effective_window((H, W), window, 0)[0], heads * d, int(c * ratio)
            slots = -(-H // w) * w * -(-W // w) * w
            macs += slots * (4 * c * q + 2 * w * w * q) + H * W * 2 * c * m
        if s < len(stages) - 1:
            macs += ((H + 1) // 2) * ((W + 1) // 2) * 4 * c * stages[s + 1][0]
    classes = config.get("num_classes", 1000)
    return macs + (stages[-1][0] * classes if classes > 0 else 0)


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
