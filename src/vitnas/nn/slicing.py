"""Pure functions giving the active slice of a supernet weight.

The supernet's forward and `extract` both call these, so training and export cannot drift apart.
Slices are views where the layout allows (leading rows/columns), so no weight is copied per step.
"""

from __future__ import annotations

from torch import Tensor

QKV_LAYOUTS = ("standard", "autoformer")
SIDES = ("left", "right")


def edge(n: int, total: int, side: str = "left") -> slice:
    """The `n` leading entries (AutoFormer's prefix slicing) or, side='right', the `n` trailing ones
    (BCNet's bilateral slicing, used by ViTAS)."""
    if side == "left":
        return slice(0, n)
    if side == "right":
        return slice(total - n, total)
    raise ValueError(f"side={side!r}; expected one of {SIDES}")


def slice_vector(v: Tensor | None, n: int, side: str = "left") -> Tensor | None:
    return None if v is None else v[edge(n, v.shape[0], side)]


def slice_linear(
    weight: Tensor, bias: Tensor | None, out_features: int, in_features: int, side: str = "left"
) -> tuple[Tensor, Tensor | None]:
    """`out_features` rows and `in_features` columns from one edge (weight entanglement)."""
    rows, cols = edge(out_features, weight.shape[0], side), edge(in_features, weight.shape[1], side)
    return weight[rows, cols], slice_vector(bias, out_features, side)


def slice_qkv(
    weight: Tensor,
    bias: Tensor | None,
    num_heads: int,
    head_dim: int,
    in_features: int,
    layout: str = "standard",
    side: str = "left",
) -> tuple[Tensor, Tensor | None]:
    """Active fused q/k/v projection, returned in [q; k; v] row order with heads leading.

    standard:   rows are (3, max_heads, head_dim); a subnet takes the first `num_heads` of each of q, k, v.
    autoformer: the reference's layout: q, k, v are rows 0::3, 1::3, 2::3 of the first
                3 * num_heads * head_dim rows, while the bias is the plain prefix of that length.
                (So a bias entry's role changes with the head count; reproduced to load its checkpoints.)
    """
    width = num_heads * head_dim
    rows = 3 * width
    if layout == "standard":
        max_width = weight.shape[0] // 3
        heads, cols = edge(width, max_width, side), edge(in_features, weight.shape[1], side)
        w = weight.view(3, max_width, weight.shape[1])[:, heads, cols].reshape(rows, in_features)
        b = None if bias is None else bias.view(3, max_width)[:, heads].reshape(rows)
        return w, b
    if side != "left":
        raise ValueError("bilateral (right-side) slicing needs the standard qkv layout")
    if layout == "autoformer":
        w = weight[:rows].view(width, 3, weight.shape[1]).transpose(0, 1)[:, :, :in_features].reshape(rows, in_features)
        return w, slice_vector(bias, rows)
    raise ValueError(f"unknown qkv layout {layout!r}; expected one of {QKV_LAYOUTS}")
