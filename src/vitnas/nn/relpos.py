"""AutoFormer's 2-D relative position encoding, computed without per-pair embeddings.

The reference builds an (N, N, head_dim) tensor `table_v[iv(i,j)] + table_h[ih(i,j)]` for every
query/key pair and multiplies it in; the backward of that gather is about a quarter of its training
time. The same numbers come out of a few small products because the vertical index depends only on
the two tokens' grid rows and the horizontal one only on their columns:

* keys:   (q . r(i,j)) = Q[i, iv(i,j)] + Q[i, ih(i,j)] with Q = q @ [table_v; table_h]^T (B, H, N, 2T);
  gather Q at the (N, rows + cols) bucket ids and broadcast-add rows and columns into (B, H, N, N).
* values: sum_j attn(i,j) r(i,j) = (attn summed per key row / column, scattered into buckets) @ tables.

Index 0 of each table is the class token's row and column, grid distances are clipped to
+-max_distance and shifted by max_distance + 1, exactly as in the reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["RelativePosition2D", "RelPosIndex", "add_relpos_logits_", "relpos_index", "relpos_logits", "relpos_values"]


class RelativePosition2D(nn.Module):
    """A vertical and a horizontal table of shape (2 * max_distance + 2, head_dim), shared by heads."""

    def __init__(self, head_dim: int, max_distance: int = 14) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_distance = max_distance
        rows = 2 * max_distance + 2
        self.table_v = nn.Parameter(torch.zeros(rows, head_dim))
        self.table_h = nn.Parameter(torch.zeros(rows, head_dim))
        nn.init.trunc_normal_(self.table_v, std=0.02)
        nn.init.trunc_normal_(self.table_h, std=0.02)

    def tables(self, head_dim: int | None = None) -> Tensor:
        """[table_v; table_h] (2T, head_dim), sliced to the leading `head_dim` columns."""
        d = self.head_dim if head_dim is None else head_dim
        return torch.cat([self.table_v[:, :d], self.table_h[:, :d]], dim=0)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_distance={self.max_distance}"


class RelPosIndex(NamedTuple):
    """Bucket ids of one grid: for each query token, [cls-v, row buckets, cls-h, column buckets]."""

    index: Tensor  # (N, 2 + grid_h + grid_w) long, ids into the concatenated tables
    grid: tuple[int, int]
    num_buckets: int  # T: rows of one table


@functools.lru_cache(maxsize=64)
def _relpos_index_cached(grid_h: int, grid_w: int, max_distance: int, num_prefix: int, device: str) -> RelPosIndex:
    if num_prefix not in (0, 1):
        raise ValueError(f"relative position supports 0 or 1 prefix (class) tokens, got {num_prefix}")
    T = 2 * max_distance + 2
    rows = torch.arange(grid_h)
    cols = torch.arange(grid_w)
    row_ids = (rows[None, :] - rows[:, None]).clamp(-max_distance, max_distance) + max_distance + 1  # (gh, gh)
    col_ids = (cols[None, :] - cols[:, None]).clamp(-max_distance, max_distance) + max_distance + 1  # (gw, gw)
    # Patch query p = r * grid_w + c sees key rows through row_ids[r] and key columns through col_ids[c].
    q_rows = row_ids.repeat_interleave(grid_w, dim=0)  # (gh*gw, gh)
    q_cols = col_ids.repeat(grid_h, 1)  # (gh*gw, gw)
    n = grid_h * grid_w
    index = torch.cat([torch.zeros(n, 1, dtype=torch.long), q_rows, torch.full((n, 1), T), q_cols + T], dim=1)
    if num_prefix:
        # The class token's query row uses bucket 0 of both tables for every key.
        cls_row = torch.cat([torch.zeros(1, 1 + grid_h, dtype=torch.long), torch.full((1, 1 + grid_w), T)], dim=1)
        index = torch.cat([cls_row, index], dim=0)
    return RelPosIndex(index.to(device), (grid_h, grid_w), T)


def relpos_index(grid: tuple[int, int], max_distance: int, num_prefix: int, device: torch.device) -> RelPosIndex:
    """Bucket ids for a grid, cached per (grid, max_distance, prefix, device). Built outside inference
    mode, so an index first made during evaluation can still be used by a training step."""
    with torch.inference_mode(False):
        return _relpos_index_cached(int(grid[0]), int(grid[1]), int(max_distance), int(num_prefix), str(device))


def _num_prefix(n_tokens: int, grid: tuple[int, int]) -> int:
    return n_tokens - grid[0] * grid[1]


def _bucket_scores(q: Tensor, tables: Tensor, rp: RelPosIndex) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q against every bucket, gathered per query: (cls-v, rows, cls-h, cols), each (B, H, N, .)."""
    B, H, N, _ = q.shape
    gh, gw = rp.grid
    scores = q @ tables.t()  # (B, H, N, 2T)
    g = torch.gather(scores, -1, rp.index.expand(B, H, N, rp.index.shape[-1]))
    return g.split([1, gh, 1, gw], dim=-1)


def relpos_logits(q: Tensor, tables: Tensor, rp: RelPosIndex) -> Tensor:
    """(q . r(i,j)) for all pairs: q (B, H, N, d), tables (2T, d) -> (B, H, N, N)."""
    cls_v, rows, cls_h, cols = _bucket_scores(q, tables, rp)
    patch = (rows.unsqueeze(-1) + cols.unsqueeze(-2)).flatten(-2)  # (B, H, N, gh*gw)
    if _num_prefix(q.shape[2], rp.grid) == 0:
        return patch
    return torch.cat([cls_v + cls_h, patch], dim=-1)


def add_relpos_logits_(logits: Tensor, q: Tensor, tables: Tensor, rp: RelPosIndex) -> Tensor:
    """`logits += relpos_logits(q, tables, rp)` in place, without building the (B, H, N, N) term: the row
    and column scores are broadcast-added into the patch keys' logits. `logits` must not be needed by
    autograd as it was (true of a matmul's output). Under ONNX export or tracing, whose graphs do not keep
    writes into views, it returns the out-of-place sum instead."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return logits + relpos_logits(q, tables, rp)
    cls_v, rows, cls_h, cols = _bucket_scores(q, tables, rp)
    prefix = _num_prefix(q.shape[2], rp.grid)
    patch = logits[..., prefix:].unflatten(-1, rp.grid)  # (B, H, N, gh, gw), a view
    patch.add_(rows.unsqueeze(-1)).add_(cols.unsqueeze(-2))
    if prefix:
        logits[..., :1].add_(cls_v + cls_h)
    return logits


def relpos_values(attn: Tensor, tables: Tensor, rp: RelPosIndex) -> Tensor:
    """sum_j attn(i,j) r(i,j): attn (B, H, N, N), tables (2T, d) -> (B, H, N, d)."""
    B, H, N, _ = attn.shape
    gh, gw = rp.grid
    prefix = _num_prefix(N, rp.grid)
    a_patch = attn[..., prefix:].reshape(B, H, N, gh, gw)
    a_cls = attn[..., :1] if prefix else attn.new_zeros(B, H, N, 1)
    weights = torch.cat([a_cls, a_patch.sum(-1), a_cls, a_patch.sum(-2)], dim=-1)  # (B, H, N, 2 + gh + gw)
    buckets = attn.new_zeros(B, H, N, 2 * rp.num_buckets)
    buckets = buckets.scatter_add(-1, rp.index.expand(B, H, N, rp.index.shape[-1]), weights)
    return buckets @ tables
