"""Weight-entangled layers of the ViT supernet: each holds the largest weights, and `active_params` gives
the leading (or, with side='right', trailing) slices a subnet uses, named as the static layers in
`vitnas.nn.layers` name theirs. `forward` runs on exactly those slices, so a subnet computes what its
extracted model computes (see `vitnas.nn.slicing`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.nn.functional import IRPEInputs, RelPosInputs, attention, drop_path, mlp
from vitnas.nn.irpe import IRPEConfig, build_irpe
from vitnas.nn.relpos import RelativePosition2D, relpos_index
from vitnas.nn.slicing import edge, slice_linear, slice_qkv

__all__ = ["SuperAttention", "SuperBlock", "SuperMlp", "ln_params", "prefixed"]


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
        """The subnet's parameters, named as in `vitnas.nn.layers.Attention`."""
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


def ln_params(norm: nn.LayerNorm, dim: int, side: str = "left") -> dict[str, Tensor]:
    """The active slice of a LayerNorm's weight and bias."""
    s = edge(dim, norm.weight.shape[0], side)
    return {"weight": norm.weight[s], "bias": norm.bias[s]}


def prefixed(prefix: str, params: dict[str, Tensor]) -> dict[str, Tensor]:
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
            **prefixed("norm1", ln_params(self.norm1, dim, side)),
            **prefixed("attn", self.attn.active_params(dim, heads, side)),
            **prefixed("norm2", ln_params(self.norm2, dim, side)),
            **prefixed("mlp", self.mlp.active_params(dim, hidden, side)),
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
        n1, n2 = ln_params(self.norm1, dim, side), ln_params(self.norm2, dim, side)
        h = F.layer_norm(x, (dim,), n1["weight"], n1["bias"], self.norm_eps)
        x = x + drop_path(self.attn(h, grid, dim, heads, attn_drop, drop, side), self.drop_path, self.training)
        h = F.layer_norm(x, (dim,), n2["weight"], n2["bias"], self.norm_eps)
        return x + drop_path(self.mlp(h, dim, hidden, drop, side), self.drop_path, self.training)
