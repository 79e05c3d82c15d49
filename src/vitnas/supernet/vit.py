"""AutoFormer's weight-entangled ViT supernet.

Every layer holds the largest weights; a subnet uses the leading slice of each (see
`vitnas.nn.slicing`). The active architecture is set explicitly (`set_active` or
`with net.active(arch):`) and read by `forward`; nothing is pushed into layers behind the scenes.
`extract(arch)` returns a plain `VisionTransformer` whose state dict is made of the very slices the
supernet's forward uses.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.costs.vit import ViTCostModel
from vitnas.models.vit import PatchEmbed, VisionTransformer, init_vit_weights, patch_grid, to_2tuple
from vitnas.nn.functional import IRPEInputs, RelPosInputs, attention, drop_path, mlp
from vitnas.nn.irpe import IRPEConfig, build_irpe
from vitnas.nn.relpos import RelativePosition2D, relpos_index
from vitnas.nn.slicing import QKV_LAYOUTS, SIDES, edge, slice_linear, slice_qkv, slice_vector
from vitnas.space.arch import ArchConfig
from vitnas.space.space import SearchSpace

__all__ = ["ViTSupernet"]

log = logging.getLogger(__name__)


class SuperAttention(nn.Module):
    def __init__(
        self,
        max_dim: int,
        max_heads: int,
        head_dim: int,
        qkv_bias: bool,
        rel_pos_max: int | None,
        qkv_layout: str,
        irpe: IRPEConfig | None = None,
        private_qk: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.qkv_layout = qkv_layout
        self.private_qk = private_qk
        if private_qk is None:
            self.qkv = nn.Linear(max_dim, 3 * max_heads * head_dim, bias=qkv_bias)
        else:  # ViTAS: q and k private to each head-count choice, v shared and sliced
            self.qk = nn.ModuleDict({f"h{h}": nn.Linear(max_dim, 2 * h * head_dim, bias=qkv_bias) for h in private_qk})
            self.v = nn.Linear(max_dim, max_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(max_heads * head_dim, max_dim)
        self.rel_pos_k = RelativePosition2D(head_dim, rel_pos_max) if rel_pos_max else None
        self.rel_pos_v = RelativePosition2D(head_dim, rel_pos_max) if rel_pos_max else None
        self.irpe = irpe
        if irpe is not None:  # tables for the most heads; a subnet uses the leading ones (or the shared one)
            for name, module in build_irpe(irpe, head_dim, max_heads).items():
                self.add_module(name, module)

    def _irpe_modules(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.named_children() if n.startswith("rpe_")}

    def active_params(self, dim: int, heads: int, side: str = "left") -> dict[str, Tensor]:
        """The subnet's parameters, named as in `vitnas.models.vit.Attention`."""
        if self.private_qk is None:
            qw, qb = slice_qkv(self.qkv.weight, self.qkv.bias, heads, self.head_dim, dim, self.qkv_layout, side)
        else:
            if heads not in self.private_qk:
                raise ValueError(f"num_heads={heads} has no private q/k (choices {list(self.private_qk)})")
            qk = self.qk[f"h{heads}"]
            vw, vb = slice_linear(self.v.weight, self.v.bias, heads * self.head_dim, dim, side)
            qw = torch.cat([qk.weight[:, edge(dim, qk.weight.shape[1], side)], vw])
            qb = None if qk.bias is None else torch.cat([qk.bias, vb])
        pw, pb = slice_linear(self.proj.weight, self.proj.bias, dim, heads * self.head_dim, side)
        out = {"qkv.weight": qw, "proj.weight": pw, "proj.bias": pb}
        if qb is not None:
            out["qkv.bias"] = qb
        for name in ("rel_pos_k", "rel_pos_v"):
            rp = getattr(self, name)
            if rp is not None:
                out[f"{name}.table_v"] = rp.table_v[:, : self.head_dim]
                out[f"{name}.table_h"] = rp.table_h[:, : self.head_dim]
        n = 1 if self.irpe is not None and self.irpe.shared_head else heads
        for prefix, module in self._irpe_modules().items():
            for pname, p in module.named_parameters():
                out[f"{prefix}.{pname}"] = p[edge(n, p.shape[0], side)]  # iRPE tables: the active heads
        return out

    def forward(
        self,
        x: Tensor,
        grid: tuple[int, int],
        dim: int,
        heads: int,
        attn_drop: float,
        proj_drop: float,
        side: str = "left",
    ) -> Tensor:
        p = self.active_params(dim, heads, side)
        rp = None
        if self.rel_pos_k is not None:
            index = relpos_index(grid, self.rel_pos_k.max_distance, x.shape[1] - grid[0] * grid[1], x.device)
            rp = RelPosInputs(index, self.rel_pos_k.tables(self.head_dim), self.rel_pos_v.tables(self.head_dim))
        ir = None
        if self.irpe is not None:  # the modules slice their tables to the heads of their input
            m = self._irpe_modules()
            if side != "left" and not self.irpe.shared_head:
                raise ValueError("per-head iRPE tables support left (prefix) slicing only")
            ir = IRPEInputs(m.get("rpe_q"), m.get("rpe_k"), m.get("rpe_v"), grid)
        return attention(
            x,
            p["qkv.weight"],
            p.get("qkv.bias"),
            p["proj.weight"],
            p["proj.bias"],
            num_heads=heads,
            head_dim=self.head_dim,
            scale=self.scale,
            relpos=rp,
            irpe=ir,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            training=self.training,
        )


class SuperMlp(nn.Module):
    def __init__(self, max_dim: int, max_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(max_dim, max_hidden)
        self.fc2 = nn.Linear(max_hidden, max_dim)

    def active_params(self, dim: int, hidden: int, side: str = "left") -> dict[str, Tensor]:
        w1, b1 = slice_linear(self.fc1.weight, self.fc1.bias, hidden, dim, side)
        w2, b2 = slice_linear(self.fc2.weight, self.fc2.bias, dim, hidden, side)
        return {"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2, "fc2.bias": b2}

    def forward(self, x: Tensor, dim: int, hidden: int, drop: float, side: str = "left") -> Tensor:
        p = self.active_params(dim, hidden, side)
        return mlp(x, p["fc1.weight"], p["fc1.bias"], p["fc2.weight"], p["fc2.bias"], drop=drop, training=self.training)


def _ln_params(norm: nn.LayerNorm, dim: int, side: str = "left") -> dict[str, Tensor]:
    s = edge(dim, norm.weight.shape[0], side)
    return {"weight": norm.weight[s], "bias": norm.bias[s]}


def _prefixed(prefix: str, params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in params.items()}


class SuperBlock(nn.Module):
    def __init__(
        self,
        max_dim: int,
        max_heads: int,
        max_hidden: int,
        head_dim: int,
        qkv_bias: bool,
        rel_pos_max: int | None,
        norm_eps: float,
        qkv_layout: str,
        drop_path: float,
        irpe: IRPEConfig | None = None,
        private_qk: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(max_dim, eps=norm_eps)
        self.attn = SuperAttention(max_dim, max_heads, head_dim, qkv_bias, rel_pos_max, qkv_layout, irpe, private_qk)
        self.norm2 = nn.LayerNorm(max_dim, eps=norm_eps)
        self.mlp = SuperMlp(max_dim, max_hidden)
        self.drop_path = drop_path
        self.norm_eps = norm_eps

    def active_params(self, dim: int, heads: int, hidden: int, side: str = "left") -> dict[str, Tensor]:
        return {
            **_prefixed("norm1", _ln_params(self.norm1, dim, side)),
            **_prefixed("attn", self.attn.active_params(dim, heads, side)),
            **_prefixed("norm2", _ln_params(self.norm2, dim, side)),
            **_prefixed("mlp", self.mlp.active_params(dim, hidden, side)),
        }

    def forward(
        self,
        x: Tensor,
        grid: tuple[int, int],
        dim: int,
        heads: int,
        hidden: int,
        drop: float,
        attn_drop: float,
        side: str = "left",
    ) -> Tensor:
        n1, n2 = _ln_params(self.norm1, dim, side), _ln_params(self.norm2, dim, side)
        h = F.layer_norm(x, (dim,), n1["weight"], n1["bias"], self.norm_eps)
        x = x + drop_path(self.attn(h, grid, dim, heads, attn_drop, drop, side), self.drop_path, self.training)
        h = F.layer_norm(x, (dim,), n2["weight"], n2["bias"], self.norm_eps)
        return x + drop_path(self.mlp(h, dim, hidden, drop, side), self.drop_path, self.training)


class ViTSupernet(nn.Module):
    """Weight-entangled ViT supernet over a `SearchSpace`.

    Options follow AutoFormer's published runs: q/k/v width `num_heads * head_dim` (head_dim 64 by
    default, taken from the space), 2-D relative position on keys and values, absolute position
    embedding, global average pooling, LayerNorm eps 1e-5, drop-path growing linearly over the
    supernet depth, dropout scaled by embed_dim / max_embed_dim. `qkv_layout="autoformer"`
    reproduces the reference's q/k/v slicing (used when loading its checkpoints).

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
        in_chans: int = 3,
        qkv_bias: bool = True,
        rel_pos: bool = True,
        rel_pos_max: int | None = None,
        abs_pos: bool = True,
        global_pool: str = "avg",
        norm_eps: float = 1e-5,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        qkv_layout: str = "standard",
        irpe: dict[str, Any] | None = None,
        private_qk: bool | None = None,
    ) -> None:
        super().__init__()
        irpe_cfg = IRPEConfig(**irpe) if irpe else None  # iRPE tables, sliced with the active heads
        # ViTAS attention: q/k private to each head-count choice, v shared
        private_qk = space.private_qk if private_qk is None else private_qk  # default: the space's setting
        self.private_qk = tuple(space.num_heads) if private_qk else None
        if private_qk and qkv_layout != "standard":
            raise ValueError("private_qk needs qkv_layout='standard'")
        if qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout={qkv_layout!r}; expected one of {QKV_LAYOUTS}")
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool={global_pool!r}; expected 'avg' or 'token'")
        self.space = space
        # Constructor arguments besides the space, so a checkpoint can rebuild this supernet.
        self.init_kwargs: dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=num_classes,
            in_chans=in_chans,
            qkv_bias=qkv_bias,
            rel_pos=rel_pos,
            rel_pos_max=rel_pos_max,
            abs_pos=abs_pos,
            global_pool=global_pool,
            norm_eps=norm_eps,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            qkv_layout=qkv_layout,
            irpe=dict(irpe) if irpe else None,
            private_qk=private_qk,
        )
        img_size = space.img_size if img_size is None else img_size
        patch_size = space.patch_size if patch_size is None else patch_size
        rel_pos_max = space.rel_pos_max if rel_pos_max is None else rel_pos_max
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.grid = patch_grid(img_size, patch_size)
        self.num_classes = num_classes
        self.head_dim = space.head_dim
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.attn_drop_rate = attn_drop_rate
        self.qkv_layout = qkv_layout
        self.max_embed_dim = E = space.max_embed_dim
        self.max_depth = space.max_depth
        self.max_hidden = int(E * space.max_mlp_ratio)
        # Everything a static subnet needs besides its arch (passed on by `extract`): the constructor
        # arguments a VisionTransformer shares, with the space's defaults filled in.
        shared = ("in_chans", "num_classes", "qkv_bias", "rel_pos", "abs_pos", "global_pool", "norm_eps", "irpe")
        self.model_kwargs: dict[str, Any] = {
            **{k: self.init_kwargs[k] for k in shared},
            "img_size": list(self.img_size),
            "patch_size": patch_size,
            "head_dim": space.head_dim,
            "rel_pos_max": rel_pos_max,
        }
        self.drop_path_rates = [drop_path_rate * i / max(self.max_depth - 1, 1) for i in range(self.max_depth)]
        num_patches = self.grid[0] * self.grid[1]
        self.patch_sizes = space.patch_sizes
        if self.patch_sizes is None:
            self.patch_embed = PatchEmbed(patch_size, in_chans, E)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, E)) if abs_pos else None
        else:  # ViTAS: every patch size has its own embedding, class token and position embedding
            grids = {p: patch_grid(img_size, p) for p in self.patch_sizes}
            self.patch_embeds = nn.ModuleDict({f"p{p}": PatchEmbed(p, in_chans, E) for p in self.patch_sizes})
            self.cls_tokens = nn.ParameterDict({f"p{p}": nn.Parameter(torch.zeros(1, 1, E)) for p in self.patch_sizes})
            self.pos_embeds = (
                nn.ParameterDict({f"p{p}": nn.Parameter(torch.zeros(1, g[0] * g[1] + 1, E)) for p, g in grids.items()})
                if abs_pos
                else None
            )
            self.pos_embed = None
        self.blocks = nn.ModuleList(
            SuperBlock(
                E,
                space.max_num_heads,
                self.max_hidden,
                space.head_dim,
                qkv_bias,
                rel_pos_max if rel_pos else None,
                norm_eps,
                qkv_layout,
                self.drop_path_rates[i],
                irpe_cfg,
                self.private_qk,
            )
            for i in range(self.max_depth)
        )
        self.norm = nn.LayerNorm(E, eps=norm_eps)
        self.head = nn.Linear(E, num_classes) if num_classes > 0 else nn.Identity()
        for name, p in self.named_parameters():
            if name.startswith(("pos_embed", "cls_token")):
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_vit_weights)
        self.costs = ViTCostModel(
            img_size=self.img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            head_dim=space.head_dim,
            qkv_bias=qkv_bias,
            rel_pos_max=rel_pos_max if rel_pos else None,
            abs_pos=abs_pos,
            irpe=dict(irpe) if irpe else None,
        )
        self._arch = space.largest()
        self._side = "left"

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
            out.update(_prefixed(f"blocks.{i}", self.blocks[i].active_params(e, heads, hidden, side)))
        out.update(_prefixed("norm", _ln_params(self.norm, e, side)))
        if self.num_classes > 0:
            out["head.weight"], out["head.bias"] = self.head.weight[:, se], self.head.bias
        return out

    def extract(self, arch: ArchConfig | None = None, side: str | None = None) -> VisionTransformer:
        """A standalone `VisionTransformer` with copies of the subnet's weights (default: the active arch
        and side)."""
        arch = self._arch if arch is None else self.check_arch(arch)
        side = self._side if side is None else side
        scale = arch.embed_dim / self.max_embed_dim
        with torch.device("meta"):  # no random init: every tensor is assigned below
            model = VisionTransformer.from_arch(
                arch,
                **{**self.model_kwargs, "patch_size": self._tokens(arch)[0]},
                drop_rate=self.drop_rate * scale,
                attn_drop_rate=self.attn_drop_rate * scale,
                drop_path_rate=self.drop_path_rates[: arch.depth],
            )
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
