"""AutoFormer's weight-entangled ViT supernet.

Every layer holds the largest weights; a subnet uses the leading slice of each (see
`vitnas.nn.slicing` and `vitnas.nn.sliced`). The active architecture is set explicitly (`set_active` or
`with net.active(arch):`) and read by `forward`; nothing is pushed into layers behind the scenes.
`extract(arch)` returns a plain `VisionTransformer` whose state dict is made of the very slices the
supernet's forward uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.costs.vit import ViTCostModel
from vitnas.models.config import DROP_FIELDS, ViTConfig
from vitnas.models.vit import VisionTransformer
from vitnas.nn.layers import PatchEmbed, init_vit_weights, patch_grid
from vitnas.nn.sliced import SuperBlock, ln_params, prefixed
from vitnas.nn.slicing import QKV_LAYOUTS, SIDES, edge, slice_vector
from vitnas.space.arch import ArchConfig
from vitnas.space.space import SearchSpace

__all__ = ["OPTIONS", "ViTSupernet"]

log = logging.getLogger(__name__)

# The `ViTConfig` fields a supernet takes as keyword options; its head_dim is the space's, and img_size,
# patch_size and rel_pos_max default to the space's.
OPTIONS = tuple(
    f.name for f in dataclasses.fields(ViTConfig) if f.name not in ("img_size", "patch_size", "num_classes", "head_dim")
)


def _init_kwargs(
    img_size: Any, patch_size: Any, num_classes: int, options: dict[str, Any], qkv_layout: str, private_qk: bool
) -> dict[str, Any]:
    """The constructor's arguments besides the space, as given (None: the space's value), defaults filled
    in: what a checkpoint stores to rebuild the supernet."""
    defaults = {f.name: f.default for f in dataclasses.fields(ViTConfig)} | {"rel_pos_max": None}
    given = {k: options.get(k, defaults[k]) for k in OPTIONS}
    irpe = given.pop("irpe")
    return dict(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        **given,
        qkv_layout=qkv_layout,
        irpe=dict(irpe) if irpe else None,
        private_qk=private_qk,
    )


class ViTSupernet(nn.Module):
    """Weight-entangled ViT supernet over a `SearchSpace`.

    Options are `ViTConfig` fields (`OPTIONS`: in_chans, qkv_bias, rel_pos, rel_pos_max, abs_pos,
    global_pool, norm_eps, drop_rate, attn_drop_rate, drop_path_rate, irpe) and default as AutoFormer's
    published runs: q/k/v width `num_heads * head_dim` (head_dim from the space), 2-D relative position on
    keys and values, absolute position embedding, global average pooling, LayerNorm eps 1e-5, drop-path
    growing linearly over the supernet depth, dropout scaled by embed_dim / max_embed_dim. iRPE tables are
    sliced with the active heads. `qkv_layout="autoformer"` reproduces the reference's q/k/v slicing (used
    when loading its checkpoints); `private_qk` (default: the space's) gives ViTAS attention, q/k private
    to each head-count choice and v shared.

    `vit_config` is the resolved `ViTConfig` (the space's defaults filled in); `init_kwargs` the arguments
    that rebuild the supernet, `ViTSupernet(space, **net.init_kwargs)`.

    The supernet runs any arch that fits its weights (`SearchSpace.capacity_violations`), which is
    looser than the space's choices: AutoFormer's own published T subnet uses mlp_ratio 3.0.
    """

    def __init__(
        self,
        space: SearchSpace,
        img_size: int | None = None,
        patch_size: int | None = None,
        num_classes: int = 1000,
        *,
        qkv_layout: str = "standard",
        private_qk: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"ViTSupernet got unexpected keyword arguments {unknown}; its options are {list(OPTIONS)}")
        private_qk = space.private_qk if private_qk is None else private_qk
        if private_qk and qkv_layout != "standard":
            raise ValueError("private_qk needs qkv_layout='standard'")
        if qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout={qkv_layout!r}; expected one of {QKV_LAYOUTS}")
        cfg = ViTConfig.from_space(space, img_size=img_size, patch_size=patch_size, num_classes=num_classes, **options)
        self.space = space
        self.vit_config = cfg
        self.init_kwargs: dict[str, Any] = _init_kwargs(
            img_size, patch_size, num_classes, options, qkv_layout, private_qk
        )
        self.private_qk = tuple(space.num_heads) if private_qk else None
        self.img_size = cfg.img_size
        self.patch_size = cfg.patch_size
        self.grid = cfg.grid
        self.num_classes = num_classes
        self.head_dim = space.head_dim
        self.global_pool = cfg.global_pool
        self.drop_rate = cfg.drop_rate
        self.attn_drop_rate = cfg.attn_drop_rate
        self.qkv_layout = qkv_layout
        self.max_embed_dim = space.max_embed_dim
        self.max_depth = space.max_depth
        self.max_hidden = int(space.max_embed_dim * space.max_mlp_ratio)
        self.drop_path_rates = cfg.drop_path_rates(self.max_depth)
        self.patch_sizes = space.patch_sizes
        self._build(cfg)
        self.costs = ViTCostModel.from_config(cfg)
        self._arch = space.largest()
        self._side = "left"

    def _build(self, cfg: ViTConfig) -> None:
        E, space = self.max_embed_dim, self.space
        if self.patch_sizes is None:
            self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, E)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, E)) if cfg.abs_pos else None
        else:  # ViTAS: every patch size has its own embedding, class token and position embedding
            grids = {p: patch_grid(cfg.img_size, p) for p in self.patch_sizes}
            self.patch_embeds = nn.ModuleDict({f"p{p}": PatchEmbed(p, cfg.in_chans, E) for p in self.patch_sizes})
            self.cls_tokens = nn.ParameterDict({f"p{p}": nn.Parameter(torch.zeros(1, 1, E)) for p in self.patch_sizes})
            self.pos_embeds = (
                nn.ParameterDict({f"p{p}": nn.Parameter(torch.zeros(1, g[0] * g[1] + 1, E)) for p, g in grids.items()})
                if cfg.abs_pos
                else None
            )
            self.pos_embed = None
        irpe = cfg.irpe_config
        self.blocks = nn.ModuleList(
            SuperBlock(
                E,
                space.max_num_heads,
                self.max_hidden,
                space.head_dim,
                cfg.qkv_bias,
                cfg.rel_pos_distance,
                cfg.norm_eps,
                self.qkv_layout,
                self.drop_path_rates[i],
                irpe,
                self.private_qk,
            )
            for i in range(self.max_depth)
        )
        self.norm = nn.LayerNorm(E, eps=cfg.norm_eps)
        self.head = nn.Linear(E, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        for name, p in self.named_parameters():
            if name.startswith(("pos_embed", "cls_token")):
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_vit_weights)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Everything a static subnet needs besides its arch and regularisation: the `ViTConfig` (space's
        defaults filled in) as `VisionTransformer` keywords, drop rates left out."""
        return {k: v for k, v in self.vit_config.to_dict().items() if k not in DROP_FIELDS}

    # -- the active architecture -------------------------------------------------------------------
    @property
    def arch(self) -> ArchConfig:
        return self._arch

    def check_arch(self, arch: ArchConfig) -> ArchConfig:
        if not isinstance(arch, ArchConfig):
            raise TypeError(f"expected an ArchConfig, got {type(arch).__name__}")
        problems = self.space.capacity_violations(arch)
        if self.private_qk is not None:
            problems += [
                f"num_heads[{i}]={h} has no private q/k; choices {list(self.private_qk)}"
                for i, h in enumerate(arch.num_heads)
                if h not in self.private_qk
            ]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(f"arch does not fit the supernet: {problems[0]}{more}")
        return arch

    @property
    def side(self) -> str:
        return self._side

    def set_active(self, arch: ArchConfig, side: str = "left") -> None:
        """Run `arch`; widths come from the leading entries of each weight, or with side='right' from
        the trailing ones (BCNet / ViTAS bilateral slicing)."""
        if side not in SIDES:
            raise ValueError(f"side={side!r}; expected one of {SIDES}")
        if side == "right" and self.qkv_layout != "standard":
            raise ValueError("right-side slicing needs qkv_layout='standard'")
        self._arch = self.check_arch(arch)
        self._side = side

    @contextlib.contextmanager
    def active(self, arch: ArchConfig, side: str = "left") -> Iterator[ViTSupernet]:
        """`with net.active(arch): net(x)` runs `arch` and restores the previous arch afterwards."""
        previous = self._arch, self._side
        self.set_active(arch, side)
        try:
            yield self
        finally:
            self._arch, self._side = previous

    # -- forward -----------------------------------------------------------------------------------
    def _tokens(self, arch: ArchConfig) -> tuple[int, nn.Module, Tensor, Tensor | None]:
        """(patch size, patch embedding, class token, position embedding) of an arch."""
        if self.patch_sizes is None:
            return self.patch_size, self.patch_embed, self.cls_token, self.pos_embed
        p = arch.patch_size
        pos = self.pos_embeds[f"p{p}"] if self.pos_embeds is not None else None
        return p, self.patch_embeds[f"p{p}"], self.cls_tokens[f"p{p}"], pos

    def forward_features(self, x: Tensor) -> Tensor:
        arch = self._arch
        e = arch.embed_dim
        patch, embed, cls_token, pos_embed = self._tokens(arch)
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        if (x.shape[-2], x.shape[-1]) != self.img_size:
            raise ValueError(
                f"input of {tuple(x.shape[-2:])} pixels gives a {grid} patch grid; "
                f"this supernet was built for {self.grid}"
            )
        scale = e / self.max_embed_dim  # AutoFormer scales dropout with the active width
        drop, attn_drop = self.drop_rate * scale, self.attn_drop_rate * scale
        side = self._side
        se = edge(e, self.max_embed_dim, side)
        x = F.conv2d(x, embed.proj.weight[se], embed.proj.bias[se], stride=patch).flatten(2).transpose(1, 2)
        x = torch.cat([cls_token[..., se].expand(x.shape[0], -1, -1), x], dim=1)
        if pos_embed is not None:
            x = x + pos_embed[..., se]
        if drop and self.training:
            x = F.dropout(x, drop, training=True)
        for block, heads, hidden in zip(self.blocks, arch.num_heads, arch.hidden_dims()):
            x = block(x, grid, e, heads, hidden, drop, attn_drop, side)
        return F.layer_norm(x, (e,), self.norm.weight[se], self.norm.bias[se], self.norm.eps)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        if pre_logits or self.num_classes == 0:
            return x
        w = self.head.weight[:, edge(x.shape[-1], self.max_embed_dim, self._side)]
        return F.linear(x, w, self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- extraction --------------------------------------------------------------------------------
    def active_state_dict(self, arch: ArchConfig | None = None, side: str | None = None) -> dict[str, Tensor]:
        """The subnet's weights (views into the supernet), keyed as in `VisionTransformer`."""
        arch = self._arch if arch is None else self.check_arch(arch)
        e = arch.embed_dim
        side = self._side if side is None else side
        se = edge(e, self.max_embed_dim, side)
        _, embed, cls_token, pos_embed = self._tokens(arch)
        out: dict[str, Tensor] = {
            "cls_token": cls_token[..., se],
            "patch_embed.proj.weight": embed.proj.weight[se],
            "patch_embed.proj.bias": slice_vector(embed.proj.bias, e, side),
        }
        if pos_embed is not None:
            out["pos_embed"] = pos_embed[..., se]
        for i, (heads, hidden) in enumerate(zip(arch.num_heads, arch.hidden_dims())):
            out.update(prefixed(f"blocks.{i}", self.blocks[i].active_params(e, heads, hidden, side)))
        out.update(prefixed("norm", ln_params(self.norm, e, side)))
        if self.num_classes > 0:
            out["head.weight"], out["head.bias"] = self.head.weight[:, se], self.head.bias
        return out

    def extract(self, arch: ArchConfig | None = None, side: str | None = None) -> VisionTransformer:
        """A standalone `VisionTransformer` with copies of the subnet's weights (default: the active arch
        and side)."""
        arch = self._arch if arch is None else self.check_arch(arch)
        side = self._side if side is None else side
        scale = arch.embed_dim / self.max_embed_dim
        cfg = self.vit_config.replace(
            patch_size=self._tokens(arch)[0],
            drop_rate=self.drop_rate * scale,
            attn_drop_rate=self.attn_drop_rate * scale,
            drop_path_rate=tuple(self.drop_path_rates[: arch.depth]),
        )
        with torch.device("meta"):  # no random init: every tensor is assigned below
            model = VisionTransformer(dataclasses.replace(arch, patch_size=None), cfg)
        with torch.no_grad():
            state = {
                k: v.detach().clone(memory_format=torch.contiguous_format)
                for k, v in self.active_state_dict(arch, side).items()
            }
        model.load_state_dict(state, strict=True, assign=True)
        return model.train(self.training)

    # -- costs -------------------------------------------------------------------------------------
    def num_params(self, arch: ArchConfig | None = None) -> int:
        """Exact parameter count of the subnet (what `extract(arch)` holds), analytic."""
        return self.costs.params(self._arch if arch is None else self.check_arch(arch))

    def num_macs(self, arch: ArchConfig | None = None, img_size: int | None = None) -> int:
        """Multiply-accumulates of one image's forward pass, analytic (see `ViTCostModel`)."""
        return self.costs.macs(self._arch if arch is None else self.check_arch(arch), img_size=img_size)
