"""The weight-entangled hierarchical supernet of S3 / AutoFormerV2 (NeurIPS'21) over an `S3Space`.

The reference releases no supernet, so this one follows AutoFormer's weight entanglement on the Swin-like
S3 network (`vitnas.models.s3`): every layer holds the largest weights of its stage and a subnet uses
leading slices of them --

- LayerNorms, the patch embedding, MLPs and the head: the leading channels / rows / columns;
- q-k-v: the first `heads * head_dim` rows of each of q, k and v (the static model's [q; k; v] layout) and
  the stage's leading input channels; the output projection the matching columns and leading rows;
- the relative-position bias table of a window w is the centre crop of the stage's largest table (window
  W): the rows of the relative offsets (dy, dx) in [-(w-1), w-1]^2, so an offset keeps its bias whatever
  the window (a leading slice would hand an offset's row to another offset); its leading heads columns;
- patch merging, whose input is four neighbours' channels side by side: the leading channels of each of
  the four groups (LayerNorm and reduction columns) and the leading reduction rows.

Each slice is taken by one function (`_block_state`, `_merge_state`, ...) that both `forward` and
`extract` use, so a subnet computes exactly what its extracted `S3Transformer` computes. Window gathers,
shift masks and relative-position indices depend on the active windows; they are computed on first use
and cached, not stored, so the supernet builds on the meta device and its state dict holds weights only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.models.s3 import (
    PatchEmbed,
    S3Transformer,
    block_shift,
    effective_window,
    gather_position_bias,
    in_windows,
    merge_neighbours,
    relative_position_index,
    s3_macs,
    s3_params,
    set_window_buffers,
    shift_window_mask,
    window_attention,
    window_partition_index,
)
from vitnas.nn.functional import drop_path, mlp
from vitnas.nn.layers import Mlp
from vitnas.nn.slicing import slice_qkv
from vitnas.space.s3 import S3Arch, S3Space
from vitnas.supernet.base import ActiveArch

__all__ = ["S3Supernet", "crop_position_table"]

log = logging.getLogger(__name__)


def crop_position_table(table: Tensor, window: int, max_window: int) -> Tensor:
    """The ((2w-1)^2, heads) bias table of window `window` inside the ((2W-1)^2, heads) one of `max_window`:
    its centre crop, so each relative offset keeps its row."""
    if window == max_window:
        return table
    side, lo = 2 * max_window - 1, max_window - window
    crop = table.view(side, side, -1)[lo : lo + 2 * window - 1, lo : lo + 2 * window - 1]
    return crop.reshape((2 * window - 1) ** 2, -1)


class _Attention(nn.Module):
    """The largest window attention of a stage: parameters only, named as `WindowAttention`'s."""

    def __init__(self, dim: int, window: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)


class _Block(nn.Module):
    """The largest Swin block of a stage: parameters only, named as `SwinTransformerBlock`'s."""

    def __init__(self, dim: int, window: int, num_heads: int, hidden: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, window, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)


class _Merge(nn.Module):
    """The largest patch merging between two stages, named as `PatchMerging`'s."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)


class _Stage(nn.Module):
    def __init__(self, blocks: list[_Block], downsample: _Merge | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


def _ln(norm: nn.LayerNorm, n: int, prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}.weight": norm.weight[:n], f"{prefix}.bias": norm.bias[:n]}


def _block_state(block: _Block, c: int, heads: int, hidden: int, window: int, head_dim: int) -> dict[str, Tensor]:
    """The active weights of one block (views where the layout allows), keyed as in `SwinTransformerBlock`."""
    a, q = block.attn, heads * head_dim
    qkv_w, qkv_b = slice_qkv(a.qkv.weight, a.qkv.bias, heads, head_dim, c)
    table = crop_position_table(a.relative_position_bias_table, window, a.window)[:, :heads]
    return {
        **_ln(block.norm1, c, "norm1"),
        "attn.relative_position_bias_table": table,
        "attn.qkv.weight": qkv_w,
        "attn.qkv.bias": qkv_b,
        "attn.proj.weight": a.proj.weight[:c, :q],
        "attn.proj.bias": a.proj.bias[:c],
        **_ln(block.norm2, c, "norm2"),
        "mlp.fc1.weight": block.mlp.fc1.weight[:hidden, :c],
        "mlp.fc1.bias": block.mlp.fc1.bias[:hidden],
        "mlp.fc2.weight": block.mlp.fc2.weight[:c, :hidden],
        "mlp.fc2.bias": block.mlp.fc2.bias[:c],
    }


def _merge_state(merge: _Merge, c: int, out: int) -> dict[str, Tensor]:
    """The active patch merging: the leading `c` channels of each of the four neighbour groups."""
    C = merge.norm.weight.shape[0] // 4
    return {
        "reduction.weight": merge.reduction.weight.view(-1, 4, C)[:out, :, :c].reshape(out, 4 * c),
        "norm.weight": merge.norm.weight.view(4, C)[:, :c].reshape(4 * c),
        "norm.bias": merge.norm.bias.view(4, C)[:, :c].reshape(4 * c),
    }


class S3Supernet(ActiveArch, nn.Module):
    """Weight-entangled supernet over an `S3Space`: per stage `max_depths` blocks of the stage's largest
    width, heads, MLP and window; a subnet runs, in each stage, the leading slices of its first `depth`
    blocks and skips the rest.

    `drop_path_rate` grows linearly over the supernet's blocks (the static model's linspace over
    `max_depth` blocks), so a block keeps its rate whatever the subnet running it, and `extract` hands
    those rates on. `drop_rate` / `attn_drop_rate` are the static model's. The network is built for
    `img_size` (default: the space's): windows are clipped to the maps at that size. `init_kwargs`
    rebuilds it: `S3Supernet(space, **net.init_kwargs)`.
    """

    arch_type = S3Arch

    def __init__(
        self,
        space: S3Space,
        num_classes: int = 1000,
        *,
        img_size: int | None = None,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(space, S3Space):
            raise TypeError(f"expected an S3Space, got {type(space).__name__}")
        self.space = space
        self.num_classes = int(num_classes)
        self.img_size = space.img_size if img_size is None else int(img_size)
        self.in_chans = int(in_chans)
        self.drop_rate, self.attn_drop_rate = float(drop_rate), float(attn_drop_rate)
        self.init_kwargs: dict[str, Any] = dict(
            num_classes=self.num_classes,
            img_size=img_size,
            in_chans=self.in_chans,
            drop_rate=self.drop_rate,
            attn_drop_rate=self.attn_drop_rate,
            drop_path_rate=float(drop_path_rate),
        )
        self.max_depth = sum(space.max_depths)
        self.drop_path_rates = tuple(torch.linspace(0, float(drop_path_rate), self.max_depth, device="cpu").tolist())
        self._offsets = [sum(space.max_depths[:s]) for s in range(space.num_stages)]
        self.resolutions = space.resolutions(self.img_size)
        # each stage's largest window as it runs: clipped to the map, as every block clips its own
        self.max_windows = tuple(
            effective_window(res, w, 0)[0] for res, w in zip(self.resolutions, space.max_window_sizes)
        )
        self._windows: dict[tuple, tuple[Tensor, Tensor, Tensor | None, Tensor]] = {}
        self._build()
        self._arch = space.largest()

    def _build(self) -> None:
        sp, E = self.space, self.space.max_embed_dims
        self.patch_embed = PatchEmbed(self.in_chans, E[0], sp.patch_size)
        self.layers = nn.ModuleList()
        for s in range(sp.num_stages):
            hidden = int(E[s] * sp.max_mlp_ratios[s])
            blocks = [
                _Block(E[s], self.max_windows[s], sp.max_num_heads[s], hidden, sp.head_dim)
                for _ in range(sp.max_depths[s])
            ]
            self.layers.append(_Stage(blocks, _Merge(E[s], E[s + 1]) if s < sp.num_stages - 1 else None))
        self.norm = nn.LayerNorm(E[-1])
        self.head = nn.Linear(E[-1], self.num_classes) if self.num_classes > 0 else nn.Identity()
        for m in self.modules():  # the static model's init
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    # -- windows -----------------------------------------------------------------------------------
    def _window(self, stage: int, index: int, window: int, device: torch.device) -> tuple:
        """(effective window, window_index, token_index, attn_mask or None, relative_position_index) of block
        `index` of `stage` with window `window`: the static block's buffers, cached per device."""
        res = self.resolutions[stage]
        w, shift = effective_window(res, window, block_shift(index, window))
        key = (res, w, shift, str(device))
        if key not in self._windows:
            with torch.device("cpu"):  # even while building on the meta device
                window_index, token_index = window_partition_index(res, w, shift)
                mask = shift_window_mask(res, w, shift)
                rel = relative_position_index(w)
            self._windows[key] = tuple(
                None if t is None else t.to(device) for t in (window_index, token_index, mask, rel)
            )
        return (w, *self._windows[key])

    # -- forward -----------------------------------------------------------------------------------
    def _run_block(self, x: Tensor, stage: int, index: int, c: int, heads: int, ratio: float, window: int) -> Tensor:
        block, d = self.layers[stage].blocks[index], self.space.head_dim
        w, window_index, token_index, mask, rel = self._window(stage, index, window, x.device)
        p = _block_state(block, c, heads, int(c * ratio), w, d)
        bias = gather_position_bias(p["attn.relative_position_bias_table"], rel)
        rate, training = self.drop_path_rates[self._offsets[stage] + index], self.training

        def attend(t: Tensor) -> Tensor:
            return window_attention(
                t,
                p["attn.qkv.weight"],
                p["attn.qkv.bias"],
                p["attn.proj.weight"],
                p["attn.proj.bias"],
                bias,
                mask,
                num_heads=heads,
                head_dim=d,
                attn_drop=self.attn_drop_rate,
                proj_drop=self.drop_rate,
                training=training,
            )

        y = F.layer_norm(x, (c,), p["norm1.weight"], p["norm1.bias"], block.norm1.eps)
        x = x + drop_path(in_windows(y, attend, w, window_index, token_index), rate, training)
        y = F.layer_norm(x, (c,), p["norm2.weight"], p["norm2.bias"], block.norm2.eps)
        fc = (p["mlp.fc1.weight"], p["mlp.fc1.bias"], p["mlp.fc2.weight"], p["mlp.fc2.bias"])
        return x + drop_path(mlp(y, *fc, drop=self.drop_rate, training=training), rate, training)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> normalised last-stage tokens (B, L, C) of the active arch."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the supernet's {self.img_size}")
        arch, pe = self._arch, self.patch_embed
        c = arch.embed_dims[0]
        x = F.conv2d(x, pe.proj.weight[:c], pe.proj.bias[:c], stride=self.space.patch_size).flatten(2).transpose(1, 2)
        x = F.dropout(
            F.layer_norm(x, (c,), pe.norm.weight[:c], pe.norm.bias[:c], pe.norm.eps), self.drop_rate, self.training
        )
        for s, layer in enumerate(self.layers):
            c = arch.embed_dims[s]
            for j, (ratio, heads, window) in enumerate(arch.blocks(s)):
                x = self._run_block(x, s, j, c, heads, ratio, window)
            if layer.downsample is not None:
                m = _merge_state(layer.downsample, c, arch.embed_dims[s + 1])
                x = merge_neighbours(x, self.resolutions[s])
                x = F.layer_norm(x, (4 * c,), m["norm.weight"], m["norm.bias"], layer.downsample.norm.eps)
                x = F.linear(x, m["reduction.weight"])
        return F.layer_norm(x, (c,), self.norm.weight[:c], self.norm.bias[:c], self.norm.eps)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(1)
        if pre_logits or self.num_classes == 0:
            return x
        return F.linear(x, self.head.weight[:, : x.shape[-1]], self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- extraction --------------------------------------------------------------------------------
    def child_config(self, arch: S3Arch | None = None, img_size: int | None = None) -> dict[str, Any]:
        """The `S3Transformer` config of a subnet: its dims, the space's patch and head dim, and the
        drop-path rates its blocks train with here. `decouple_qkv` only when some q-k-v width differs from
        its stage's dim, so the released models' configs come out as theirs."""
        arch = self._arch if arch is None else self.check_arch(arch)
        d = self.space.head_dim
        rates = [self.drop_path_rates[o + j] for o, depth in zip(self._offsets, arch.depths) for j in range(depth)]
        return dict(
            img_size=self.img_size if img_size is None else int(img_size),
            patch_size=self.space.patch_size,
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            embed_dims=list(arch.embed_dims),
            depths=list(arch.depths),
            num_heads=[list(h) for h in arch.num_heads],
            window_sizes=[list(w) for w in arch.window_sizes],
            mlp_ratios=[list(m) for m in arch.mlp_ratios],
            head_dim=d,
            drop_rate=self.drop_rate,
            attn_drop_rate=self.attn_drop_rate,
            drop_path_rate=rates,
            decouple_qkv=any(h * d != e for e, hs in zip(arch.embed_dims, arch.num_heads) for h in hs),
        )

    def active_state_dict(self, arch: S3Arch | None = None) -> dict[str, Tensor]:
        """The subnet's weights (views into the supernet where the layout allows) and the persistent
        buffers of its windows, keyed as in `S3Transformer`."""
        arch = self._arch if arch is None else self.check_arch(arch)
        pe, device = self.patch_embed, self.norm.weight.device
        c = arch.embed_dims[0]
        out = {"patch_embed.proj.weight": pe.proj.weight[:c], "patch_embed.proj.bias": pe.proj.bias[:c]}
        out.update(_ln(pe.norm, c, "patch_embed.norm"))
        for s, layer in enumerate(self.layers):
            c = arch.embed_dims[s]
            for j, (ratio, heads, window) in enumerate(arch.blocks(s)):
                prefix = f"layers.{s}.blocks.{j}."
                w, _, _, mask, rel = self._window(s, j, window, device)
                state = _block_state(layer.blocks[j], c, heads, int(c * ratio), w, self.space.head_dim)
                out.update({prefix + k: v for k, v in state.items()})
                out[prefix + "attn.relative_position_index"] = rel
                if mask is not None:
                    out[prefix + "attn_mask"] = mask
            if layer.downsample is not None:
                state = _merge_state(layer.downsample, c, arch.embed_dims[s + 1])
                out.update({f"layers.{s}.downsample.{k}": v for k, v in state.items()})
        out.update(_ln(self.norm, c, "norm"))
        if self.num_classes > 0:
            out["head.weight"], out["head.bias"] = self.head.weight[:, :c], self.head.bias
        return out

    def extract(self, arch: S3Arch | None = None, side: str | None = None) -> S3Transformer:
        """A standalone `S3Transformer` with copies of the subnet's weights (default: the active arch), in
        the supernet's train/eval mode; `side` is accepted and ignored, as by `set_active`."""
        config = self.child_config(arch)
        with torch.device("meta"):  # no random init: every tensor is assigned below
            model = S3Transformer(**config)
        with torch.no_grad():
            state = {k: v.clone(memory_format=torch.contiguous_format) for k, v in self.active_state_dict(arch).items()}
        model.load_state_dict(state, strict=True, assign=True)
        return set_window_buffers(model).train(self.training)

    # -- costs -------------------------------------------------------------------------------------
    def num_params(self, arch: S3Arch | None = None) -> int:
        """Exact parameter count of the subnet (what `extract(arch)` holds), by arithmetic."""
        return s3_params(self.child_config(arch))

    def num_macs(self, arch: S3Arch | None = None, img_size: int | None = None) -> int:
        """Multiply-accumulates of one image's forward pass (default: at `img_size`), by arithmetic; see
        `vitnas.models.s3.s3_macs`."""
        return s3_macs(self.child_config(arch, img_size))
