"""iRPE: image relative position encoding (Wu et al., ICCV'21), computed in its efficient forms.

Bucket ids follow the reference (microsoft/Cream, iRPE/DeiT-with-iRPE/irpe.py): positions are
(row, col) in row-major token order, differences are query minus key, and the piecewise index

    g(x) = round(x)                                               if |x| <= alpha
           sign(x) * min(beta, round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha)))  otherwise

is truncated to an integer after the clip (so its range is [-int(beta), int(beta)]), with alpha = r,
beta = 2r, gamma = 8r for a ratio r. Methods:

* euc:     g(round(sqrt(drow^2 + dcol^2))) + int(beta)
* quant:   g(drow^2 + dcol^2) + int(beta)
* cross:   two tables, rows g(drow) + int(beta) and columns g(dcol) + int(beta), summed
* product: (g(drow) + int(beta)) * (2 int(beta) + 1) + g(dcol) + int(beta)

Non-patch tokens (the class token) get one extra bucket for their whole rows and columns.
Contextual mode never builds an (L, L, head_dim) tensor: keys/queries use x @ table -> (B, H, L,
buckets) and a gather; values scatter the attention into buckets and multiply by the table.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["IRPEConfig", "IRPE", "IRPECross", "piecewise_index", "irpe_bucket_ids", "num_buckets", "METHODS"]

METHODS = ("euc", "quant", "cross", "product")
MODES = ("bias", "contextual")


@dataclass(frozen=True)
class IRPEConfig:
    method: str = "product"  # euc | quant | cross | product
    mode: str = "contextual"  # contextual (a vector per bucket) | bias (a scalar per bucket and head)
    ratio: float = 1.9  # alpha = ratio, beta = 2 ratio, gamma = 8 ratio
    shared_head: bool = True  # one table for all heads
    on: str = "k"  # any of q, k, v
    skip: int = 1  # non-patch tokens (the class token), which share one extra bucket

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"iRPE method={self.method!r}; expected one of {METHODS}")
        if self.mode not in MODES:
            raise ValueError(f"iRPE mode={self.mode!r}; expected one of {MODES}")
        if not self.on or set(self.on) - set("qkv"):
            raise ValueError(f"iRPE on={self.on!r}; expected letters from 'qkv'")
        if self.mode == "bias" and "v" in self.on:
            raise ValueError("iRPE bias mode applies to q and k only (a scalar bias cannot act on values)")
        if self.ratio <= 0 or self.skip < 0:
            raise ValueError(f"iRPE needs ratio > 0 and skip >= 0, got ratio={self.ratio}, skip={self.skip}")

    @property
    def alpha(self) -> float:
        return 1.0 * self.ratio

    @property
    def beta(self) -> float:
        return 2.0 * self.ratio

    @property
    def gamma(self) -> float:
        return 8.0 * self.ratio


def piecewise_index(x: Tensor, alpha: float, beta: float, gamma: float) -> Tensor:
    """The piecewise index g(x) as a long tensor (see the module docstring for the exact rounding)."""
    x = x.to(torch.float32) if not x.is_floating_point() else x
    mag = x.abs()
    outer = mag > alpha
    far = (alpha + torch.log(mag.clamp(min=1e-12) / alpha) / math.log(gamma / alpha) * (beta - alpha)).round()
    far = (torch.sign(x) * far.clamp(max=beta)).trunc()
    return torch.where(outer, far, x.round()).to(torch.long)


def num_buckets(cfg: IRPEConfig) -> int:
    """Buckets of one table, including the extra one for non-patch tokens when skip > 0."""
    b = int(cfg.beta)
    n = (2 * b + 1) ** 2 if cfg.method == "product" else 2 * b + 1
    return n + (1 if cfg.skip > 0 else 0)


@functools.lru_cache(maxsize=64)
def _bucket_ids_cached(method: str, ratio: float, h: int, w: int, skip: int, part: str, device: str) -> Tensor:
    cfg = IRPEConfig(method=method, ratio=ratio, skip=skip, mode="contextual", on="k")
    a, b, g = cfg.alpha, cfg.beta, cfg.gamma
    bi = int(b)
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    dr = rows[:, None] - rows[None, :]  # query minus key
    dc = cols[:, None] - cols[None, :]
    if method == "product":
        ids = (piecewise_index(dr, a, b, g) + bi) * (2 * bi + 1) + piecewise_index(dc, a, b, g) + bi
    elif method == "euc":
        ids = piecewise_index((dr.square() + dc.square()).float().sqrt().round(), a, b, g) + bi
    elif method == "quant":
        ids = piecewise_index(dr.square() + dc.square(), a, b, g) + bi
    else:  # cross: rows or columns
        ids = piecewise_index(dr if part == "rows" else dc, a, b, g) + bi
    if skip > 0:
        extra = num_buckets(cfg) - 1
        full = torch.full((skip + h * w, skip + h * w), extra, dtype=torch.long)
        full[skip:, skip:] = ids
        ids = full
    return ids.to(device).contiguous()


def irpe_bucket_ids(
    cfg: IRPEConfig, grid: tuple[int, int], device: torch.device | str = "cpu", part: str = ""
) -> Tensor:
    """(skip + h*w, skip + h*w) bucket ids, cached per grid and device. `part` is 'rows' or 'cols' for
    the two tables of the cross method. Any grid works, square or not."""
    if cfg.method == "cross" and part not in ("rows", "cols"):
        raise ValueError("the cross method has two tables: pass part='rows' or part='cols'")
    with torch.inference_mode(False):
        return _bucket_ids_cached(
            cfg.method, float(cfg.ratio), int(grid[0]), int(grid[1]), int(cfg.skip), part, str(device)
        )


class IRPE(nn.Module):
    """One table, for one of q, k, v. `transposed` (q and k): logits from the token's query/key vector;
    otherwise (v): values from the attention weights. Tables start at zero, as in the reference."""

    def __init__(self, cfg: IRPEConfig, head_dim: int, num_heads: int, *, transposed: bool, part: str = "") -> None:
        super().__init__()
        self.cfg, self.head_dim, self.transposed, self.part = cfg, head_dim, transposed, part
        self.num_heads = 1 if cfg.shared_head else num_heads
        nb = num_buckets(cfg)
        self.num_buckets = nb
        if cfg.mode == "bias":
            if not transposed:
                raise ValueError("iRPE bias mode cannot act on values")
            self.lookup_table_bias = nn.Parameter(torch.zeros(self.num_heads, nb))
        elif transposed:
            self.lookup_table_weight = nn.Parameter(torch.zeros(self.num_heads, head_dim, nb))
        else:
            self.lookup_table_weight = nn.Parameter(torch.zeros(self.num_heads, nb, head_dim))

    def ids(self, tokens: int, grid: tuple[int, int] | None, device: torch.device) -> Tensor:
        if grid is None:
            side = int(math.sqrt(tokens))
            grid = (side, side)
        if tokens - grid[0] * grid[1] != self.cfg.skip:
            raise ValueError(
                f"iRPE configured for skip={self.cfg.skip} non-patch tokens, but {tokens} tokens on a "
                f"{grid} grid leave {tokens - grid[0] * grid[1]}"
            )
        return irpe_bucket_ids(self.cfg, grid, device, self.part)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None, head_dim: int | None = None) -> Tensor:
        """transposed: x (B, H, L, d) -> logits (B, H, L, L); else x = attention (B, H, L, L) -> (B, H, L, d).
        Per-head tables are sliced to the leading H heads and `head_dim` columns (supernets)."""
        L = x.shape[2]
        ids = self.ids(L, grid, x.device)
        heads = 1 if self.cfg.shared_head else x.shape[1]
        if self.cfg.mode == "bias":
            return self.lookup_table_bias[:heads, ids].unsqueeze(0)  # (1, Hn, L, L)
        d = head_dim or self.head_dim
        if self.transposed:
            table = self.lookup_table_weight[:heads, :d]  # (Hn, d, nb)
            scores = x @ table.unsqueeze(0)  # (B, H, L, nb)
            B, H = scores.shape[:2]
            return torch.gather(scores, -1, ids.expand(B, H, L, L))
        table = self.lookup_table_weight[:heads, :, :d]  # (Hn, nb, d)
        B, H = x.shape[:2]
        buckets = x.new_zeros(B, H, L, self.num_buckets).scatter_add(-1, ids.expand(B, H, L, L), x)
        return buckets @ table.unsqueeze(0)

    def extra_repr(self) -> str:
        return (
            f"method={self.cfg.method}, mode={self.cfg.mode}, heads={self.num_heads}, "
            f"buckets={self.num_buckets}, transposed={self.transposed}"
        )


class IRPECross(nn.Module):
    """The cross method: a row table and a column table, whose outputs add."""

    def __init__(self, cfg: IRPEConfig, head_dim: int, num_heads: int, *, transposed: bool) -> None:
        super().__init__()
        self.rp_rows = IRPE(cfg, head_dim, num_heads, transposed=transposed, part="rows")
        self.rp_cols = IRPE(cfg, head_dim, num_heads, transposed=transposed, part="cols")

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None, head_dim: int | None = None) -> Tensor:
        return self.rp_rows(x, grid, head_dim) + self.rp_cols(x, grid, head_dim)


def build_irpe(cfg: IRPEConfig, head_dim: int, num_heads: int) -> dict[str, nn.Module]:
    """{'rpe_q': ..., 'rpe_k': ..., 'rpe_v': ...} for the letters in `cfg.on` (named as the reference)."""
    cls = IRPECross if cfg.method == "cross" else IRPE
    return {f"rpe_{c}": cls(cfg, head_dim, num_heads, transposed=c != "v") for c in "qkv" if c in cfg.on}
