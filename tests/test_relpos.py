"""The bucketed relative-position products against AutoFormer's per-pair definition."""

from __future__ import annotations

import pytest
import torch

from vitnas.nn.relpos import add_relpos_logits_, relpos_index, relpos_logits, relpos_values


def pair_embeddings(table_v, table_h, grid, max_distance, prefix):
    """Reference semantics, per pair: (N, N, d) = table_v[iv] + table_h[ih]; index 0 for the class token."""
    gh, gw = grid
    n = gh * gw
    pos = torch.arange(n)
    rows, cols = pos // gw, pos % gw
    iv = (rows[None, :] - rows[:, None]).clamp(-max_distance, max_distance) + max_distance + 1
    ih = (cols[None, :] - cols[:, None]).clamp(-max_distance, max_distance) + max_distance + 1
    if prefix:
        iv = torch.nn.functional.pad(iv, (1, 0, 1, 0), value=0)
        ih = torch.nn.functional.pad(ih, (1, 0, 1, 0), value=0)
    return table_v[iv] + table_h[ih]


@pytest.mark.parametrize("grid,max_distance,prefix", [((4, 4), 14, 1), ((3, 5), 2, 1), ((4, 3), 1, 0), ((2, 2), 7, 1)])
def test_bucketed_products_equal_per_pair(grid, max_distance, prefix):
    torch.manual_seed(0)
    d, B, H = 8, 2, 3
    T = 2 * max_distance + 2
    tv = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    th = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    N = grid[0] * grid[1] + prefix
    q = torch.randn(B, H, N, d, dtype=torch.float64, requires_grad=True)
    attn = torch.randn(B, H, N, N, dtype=torch.float64).softmax(-1).requires_grad_()
    rp = relpos_index(grid, max_distance, prefix, torch.device("cpu"))
    tables = torch.cat([tv, th])

    emb = pair_embeddings(tv, th, grid, max_distance, prefix)  # (N, N, d)
    want_k = torch.einsum("bhid,ijd->bhij", q, emb)
    want_v = torch.einsum("bhij,ijd->bhid", attn, emb)
    got_k = relpos_logits(q, tables, rp)
    got_v = relpos_values(attn, tables, rp)
    torch.testing.assert_close(got_k, want_k)
    torch.testing.assert_close(got_v, want_v)

    # Gradients agree too (with respect to queries, attention and both tables).
    w1, w2 = torch.randn_like(want_k), torch.randn_like(want_v)
    want = torch.autograd.grad((want_k * w1).sum() + (want_v * w2).sum(), (q, attn, tv, th))
    got = torch.autograd.grad((got_k * w1).sum() + (got_v * w2).sum(), (q, attn, tv, th))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)

    # The in-place form (added into a matmul's logits, as attention does) gives the same values and gradients.
    k = torch.randn(B, H, N, d, dtype=torch.float64, requires_grad=True)
    emb = pair_embeddings(tv, th, grid, max_distance, prefix)
    want_l = q @ k.transpose(-2, -1) + torch.einsum("bhid,ijd->bhij", q, emb)
    got_l = add_relpos_logits_(q @ k.transpose(-2, -1), q, tables, rp)
    torch.testing.assert_close(got_l, want_l)
    want = torch.autograd.grad((want_l * w1).sum(), (q, k, tv, th))
    got = torch.autograd.grad((got_l * w1).sum(), (q, k, tv, th))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_index_is_cached_per_grid_and_device():
    a = relpos_index((14, 14), 14, 1, torch.device("cpu"))
    b = relpos_index((14, 14), 14, 1, torch.device("cpu"))
    assert a.index is b.index
    assert a.index.shape == (197, 2 + 14 + 14)
    assert relpos_index((7, 14), 14, 1, torch.device("cpu")).index.shape == (99, 2 + 7 + 14)


def test_index_made_in_inference_mode_serves_training():
    from vitnas.nn.relpos import _relpos_index_cached

    _relpos_index_cached.cache_clear()
    with torch.inference_mode():
        relpos_index((3, 3), 2, 1, torch.device("cpu"))
    q = torch.randn(1, 1, 10, 4, requires_grad=True)
    tables = torch.randn(12, 4, requires_grad=True)
    relpos_logits(q, tables, relpos_index((3, 3), 2, 1, torch.device("cpu"))).sum().backward()
    assert q.grad is not None and tables.grad is not None
