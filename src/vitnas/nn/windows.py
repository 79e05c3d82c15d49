"""Shifted-window helpers (Swin, S3): the relative-position index of a window, the gather indices that
shift, pad and partition a token sequence into windows (and back), and the mask between shift regions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MASK_VALUE", "relative_position_index", "shift_window_mask", "window_partition_index"]

MASK_VALUE = -100.0  # the reference's value between tokens of different shift regions


def relative_position_index(window: int) -> Tensor:
    """(w^2, w^2) long: (dy + w - 1) * (2w - 1) + (dx + w - 1) for query i, key j, d = pos_i - pos_j."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def _region_labels(size: int, padded: int, window: int, shift: int) -> Tensor:
    """Per row (or column) of the shifted, padded map: 0 before the wrapped-around part, 1 in it, 2 padding.

    With `size == padded` this separates the same pairs inside a window as the reference's three slices
    (0:-w, -w:-s, -s:), whose first two regions never share a window."""
    pos = torch.arange(padded)
    labels = (pos >= size - shift).long() if shift else torch.zeros(padded, dtype=torch.long)
    return torch.where(pos >= size, torch.full_like(labels, 2), labels)


def window_partition_index(resolution: tuple[int, int], window: int, shift: int) -> tuple[Tensor, Tensor]:
    """Gather indices between a (H*W) token sequence and its windows (nW * w^2 slots): the map is rolled
    by (-shift, -shift), padded at the bottom/right to multiples of `window` and cut into windows in
    row-major order, as the reference's roll + window_partition. Returns (window_index, token_index):
    `tokens[window_index]` are the window slots, padded ones reading token H*W (a zero token the caller
    appends); `slots[token_index]` takes each token back from its slot, undoing the shift and the padding."""
    H, W = resolution
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    rows, cols = torch.arange(Hp), torch.arange(Wp)
    src_r, src_c = (rows + shift) % H, (cols + shift) % W
    src = src_r[:, None] * W + src_c[None, :]
    src = src.masked_fill((rows >= H)[:, None] | (cols >= W)[None, :], H * W)
    window_index = src.view(Hp // window, window, Wp // window, window).transpose(1, 2).reshape(-1)
    slots = torch.arange(window_index.numel())
    token_index = torch.zeros(H * W + 1, dtype=torch.long).scatter_(0, window_index, slots)[: H * W]
    return window_index, token_index


def shift_window_mask(resolution: tuple[int, int], window: int, shift: int) -> Tensor | None:
    """(nW, w^2, w^2) additive mask (0 / -100) for the windows of a map shifted by `shift` and padded to
    multiples of `window`; None when no pair needs masking (no shift and no padding)."""
    H, W = resolution
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    if shift == 0 and (Hp, Wp) == (H, W):
        return None
    labels = _region_labels(H, Hp, window, shift)[:, None] * 3 + _region_labels(W, Wp, window, shift)[None, :]
    labels = labels.view(Hp // window, window, Wp // window, window).transpose(1, 2).reshape(-1, window * window)
    same = labels[:, :, None] == labels[:, None, :]
    return torch.zeros(same.shape).masked_fill(~same, MASK_VALUE)
