"""The attention and MLP computations shared by static models and the supernet.

Static layers call these with their own parameters, supernet layers with the active slices, so a
subnet computes exactly what its extracted model computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from vitnas.nn.relpos import RelPosIndex, add_relpos_logits_, relpos_values

__all__ = ["IRPEInputs", "RelPosInputs", "attention", "mlp", "drop_path"]


class IRPEInputs(NamedTuple):
    """iRPE modules (`vitnas.nn.irpe.IRPE`, called as module(x, grid, head_dim)) for q, k, v or None."""

    q: Callable | None
    k: Callable | None
    v: Callable | None
    grid: tuple[int, int] | None


class RelPosInputs(NamedTuple):
    index: RelPosIndex
    tables_k: Tensor | None  # (2T, head_dim) or None when keys carry no relative position
    tables_v: Tensor | None


def attention(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    *,
    num_heads: int,
    head_dim: int,
    scale: float,
    relpos: RelPosInputs | None = None,
    irpe: IRPEInputs | None = None,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Multi-head self-attention; qkv rows are laid out [q; k; v], each (num_heads, head_dim).

    `relpos` is AutoFormer's 2-D relative position, `irpe` the iRPE tables; with either the attention
    is computed explicitly (their value terms need the attention weights), otherwise by SDPA."""
    B, N, _ = x.shape
    qkv = F.linear(x, qkv_weight, qkv_bias).view(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, d)
    p = attn_drop if training else 0.0
    if relpos is None and irpe is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)
    else:
        q = q * scale
        logits = q @ k.transpose(-2, -1)
        if relpos is not None and relpos.tables_k is not None:
            logits = add_relpos_logits_(logits, q, relpos.tables_k, relpos.index)
        if irpe is not None and irpe.k is not None:  # iRPE on keys: the scaled query against the table
            logits = logits + irpe.k(q, irpe.grid, head_dim)
        if irpe is not None and irpe.q is not None:  # on queries: the scaled key, transposed (reference order)
            logits = logits + irpe.q(k * scale, irpe.grid, head_dim).transpose(-2, -1)
        attn = logits.softmax(dim=-1)
        if p:
            attn = F.dropout(attn, p, training=True)
        out = attn @ v
        if relpos is not None and relpos.tables_v is not None:
            out = out.add_(relpos_values(attn, relpos.tables_v, relpos.index))
        if irpe is not None and irpe.v is not None:
            out = out + irpe.v(attn, irpe.grid, head_dim)
    out = out.transpose(1, 2).reshape(B, N, num_heads * head_dim)
    out = F.linear(out, proj_weight, proj_bias)
    if proj_drop and training:
        out = F.dropout(out, proj_drop, training=True)
    return out


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    *,
    drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    x = F.gelu(F.linear(x, fc1_weight, fc1_bias))
    if drop and training:
        x = F.dropout(x, drop, training=True)
    x = F.linear(x, fc2_weight, fc2_bias)
    if drop and training:
        x = F.dropout(x, drop, training=True)
    return x


def drop_path(x: Tensor, prob: float, training: bool) -> Tensor:
    """Stochastic depth per sample: zero a residual branch with probability `prob`, rescale the rest."""
    if prob == 0.0 or not training:
        return x
    keep = 1.0 - prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep
