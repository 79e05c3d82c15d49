"""S3 / AutoFormerV2-T/S/B against facts of the reference (microsoft/Cream, AutoFormerV2/model/SSS.py
built from configs/S3-{T,S,B}.yaml as evaluation.py does).

The window-attention semantics are re-stated here independently of vitnas's code as a slow per-query
loop. Outputs of the real reference code can be checked too: point VITNAS_S3_FIXTURES at a folder of
`<name>.pth` files, each {"name", "kwargs", "state_dict", "x", "logits"} (see the docstring of
`test_reference_fixtures`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import vitnas
from vitnas.costs.macs import count_macs
from vitnas.models.s3 import PatchMerging, S3Transformer, SwinTransformerBlock

# The reference's parameters and MACs (FlopCounterMode / 2) at 224 px and 1000 classes; published 28.33M /
# 49.74M / 71.13M parameters (the AutoFormerV2 README lists 28M / 50M / 71M and no FLOPs).
REFERENCE = {
    "s3_tiny": (28_328_674, 4_623_332_352, 28.33e6),
    "s3_small": (49_737_298, 9_404_703_744, 49.74e6),
    "s3_base": (71_125_762, 13_655_012_352, 71.13e6),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameters_and_macs(name):
    params, macs, published = REFERENCE[name]
    with torch.device("meta"):
        model = vitnas.create_model(name).eval()
    n = sum(p.numel() for p in model.parameters())
    assert n == params
    assert n == pytest.approx(published, abs=0.005e6)
    assert count_macs(name) == macs  # on meta, where SDPA decomposes into counted matmuls


def reference_s3_tiny_shapes() -> dict[str, tuple[int, ...]]:
    """The reference's S3-T state dict (187 entries), from its structure: per stage (depth, dim, heads,
    window after clipping to the map, map side); shifted blocks (odd index) keep an `attn_mask` buffer
    while the window is smaller than the map; every block keeps `relative_position_index`."""
    stages = [(2, 96, 3, 7, 56), (2, 192, 6, 7, 28), (6, 384, 12, 14, 14), (2, 768, 24, 7, 7)]
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (96, 3, 4, 4),
        "patch_embed.proj.bias": (96,),
        "patch_embed.norm.weight": (96,),
        "patch_embed.norm.bias": (96,),
        "norm.weight": (768,),
        "norm.bias": (768,),
        "head.weight": (1000, 768),
        "head.bias": (1000,),
    }
    for s, (depth, dim, heads, w, side) in enumerate(stages):
        for i in range(depth):
            p = f"layers.{s}.blocks.{i}."
            shapes.update(
                {
                    p + "norm1.weight": (dim,),
                    p + "norm1.bias": (dim,),
                    p + "attn.relative_position_bias_table": ((2 * w - 1) ** 2, heads),
                    p + "attn.relative_position_index": (w * w, w * w),
                    p + "attn.qkv.weight": (3 * dim, dim),
                    p + "attn.qkv.bias": (3 * dim,),
                    p + "attn.proj.weight": (dim, dim),
                    p + "attn.proj.bias": (dim,),
                    p + "norm2.weight": (dim,),
                    p + "norm2.bias": (dim,),
                    p + "mlp.fc1.weight": (4 * dim, dim),
                    p + "mlp.fc1.bias": (4 * dim,),
                    p + "mlp.fc2.weight": (dim, 4 * dim),
                    p + "mlp.fc2.bias": (dim,),
                }
            )
            if i % 2 and side > w:
                shapes[p + "attn_mask"] = ((side // w) ** 2, w * w, w * w)
        if s < 3:
            p = f"layers.{s}.downsample."
            shapes.update({p + "reduction.weight": (2 * dim, 4 * dim), p + "norm.weight": (4 * dim,)})
            shapes[p + "norm.bias"] = (4 * dim,)
    return shapes


def test_state_dict_keys_and_shapes_match_the_reference():
    want = reference_s3_tiny_shapes()
    assert len(want) == 187
    with torch.device("meta"):
        model = vitnas.create_model("s3_tiny")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    g = torch.Generator().manual_seed(0)
    sd = {
        k: torch.randint(0, 9, s, generator=g) if k.endswith("_index") else torch.randn(s, generator=g)
        for k, s in want.items()
    }
    assert not model.load_state_dict(sd, strict=True, assign=True).missing_keys


def swin_slice_mask(side: int, w: int, s: int) -> torch.Tensor:
    """The reference's attn_mask: label 3x3 slices (0:-w, -w:-s, -s:) of the shifted map, -100 between labels."""
    img = torch.zeros(side, side)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[hs, ws] = cnt
            cnt += 1
    win = img.view(side // w, w, side // w, w).transpose(1, 2).reshape(-1, w * w)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


@pytest.mark.parametrize("side,w", [(56, 7), (28, 7), (56, 14), (28, 14), (8, 4)])
def test_buffers_equal_the_reference_formulas(side, w):
    block = SwinTransformerBlock(32, (side, side), 1, w, w // 2, 1.0)
    assert torch.equal(block.attn_mask, swin_slice_mask(side, w, w // 2))
    idx = block.attn.relative_position_index
    ys, xs = torch.arange(w).repeat_interleave(w), torch.arange(w).repeat(w)
    i, j = 5 % (w * w), (3 * w + 1) % (w * w)
    assert idx.dtype == torch.int64 and idx.shape == (w * w, w * w)
    assert idx[i, j] == (ys[i] - ys[j] + w - 1) * (2 * w - 1) + xs[i] - xs[j] + w - 1
    assert idx.min() == 0 and idx.max() == (2 * w - 1) ** 2 - 1 and idx[0, 0] == idx.diagonal()[-1]


def naive_block(block: SwinTransformerBlock, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Per query: keys are the tokens in the same window of the map shifted by (-s, -s) (padded at the
    bottom/right when not a multiple of the window) that lie on the same side of both wrap-around seams;
    biases come from the table at (dy + w - 1) * (2w - 1) + dx + w - 1 of window-local offsets."""
    w, s, attn = block.window, block.shift, block.attn
    B, L, C = x.shape
    h, d = attn.num_heads, attn.head_dim
    r, c = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    pr, pc = (r - s) % H, (c - s) % W  # positions in the shifted frame
    wrap_r, wrap_c = pr >= H - s, pc >= W - s
    q, k, v = attn.qkv(block.norm1(x)).view(B, L, 3, h, d).unbind(2)
    out = x.new_empty(B, L, h, d)
    for i in range(L):
        keys = (pr // w == pr[i] // w) & (pc // w == pc[i] // w) & (wrap_r == wrap_r[i]) & (wrap_c == wrap_c[i])
        rel = (pr[i] - pr[keys] + w - 1) * (2 * w - 1) + pc[i] - pc[keys] + w - 1
        logits = (q[:, i, None] * d**-0.5 * k[:, keys]).sum(-1) + attn.relative_position_bias_table[rel]
        out[:, i] = (logits.softmax(1)[..., None] * v[:, keys]).sum(1)
    y = x + attn.proj(out.reshape(B, L, h * d))
    return y + block.mlp(block.norm2(y))


@pytest.mark.parametrize(
    "res,window,shift",
    [((8, 8), 4, 2), ((8, 8), 4, 0), ((6, 10), 4, 2), ((9, 7), 4, 1), ((3, 5), 7, 3)],
    ids=["shift", "plain", "shift+pad", "shift+pad-odd", "clipped+pad"],
)
def test_window_attention_matches_a_per_query_loop(res, window, shift):
    torch.manual_seed(0)
    block = SwinTransformerBlock(64, res, 2, window, shift, 2.0).eval().double()  # float64: peaky softmax
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 2.0)  # biases and masks must matter
        block.attn.qkv.weight.mul_(5)  # logits spread well below 100: the reference masks with -100, not -inf
    x = torch.randn(2, res[0] * res[1], 64, dtype=torch.float64)
    with torch.no_grad():
        want = naive_block(block, x, *res)
        got = block(x)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_patch_merging_concatenates_neighbours_in_the_reference_order():
    torch.manual_seed(0)
    merge = PatchMerging((4, 6), 8, 16)
    x = torch.randn(2, 24, 8)
    m = x.view(2, 4, 6, 8)
    cat = torch.cat([m[:, 0::2, 0::2], m[:, 1::2, 0::2], m[:, 0::2, 1::2], m[:, 1::2, 1::2]], -1).view(2, 6, 32)
    torch.testing.assert_close(merge(x), merge.reduction(merge.norm(cat)))


def test_per_block_values_heads_and_hooks():
    # The reference configs list values per block (S3-T lists 8 for its 6-block stage); extras are ignored.
    model = S3Transformer(
        img_size=64,
        num_classes=0,
        embed_dims=(32, 64, 96, 128),
        depths=(1, 2, 1, 1),
        num_heads=(1, [2, 2, 2], 3, 4),
        window_sizes=(4, [2, 4], 2, 1),
        mlp_ratios=(2.0, [1.0, 3.0], 2.0, 2.0),
    ).eval()
    assert model.layers[1].blocks[1].mlp.fc1.out_features == 192
    assert [b.window for b in model.layers[1].blocks] == [2, 4] and model.layers[1].blocks[1].shift == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 4, 128)
        assert torch.equal(model(x), feats.mean(1))  # num_classes=0: pooled features
    with pytest.raises(ValueError, match="input size"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="num_heads"):
        S3Transformer(embed_dims=(96, 192, 384, 768), num_heads=(4, 6, 12, 24))


def test_reference_fixtures():
    """Logits of the real reference: each `<name>.pth` in $VITNAS_S3_FIXTURES holds the registered
    `name`, `kwargs` for create_model, the reference's `state_dict`, an input `x` and its `logits`."""
    folder = os.environ.get("VITNAS_S3_FIXTURES")
    if not folder:
        pytest.skip("set VITNAS_S3_FIXTURES to a folder of reference fixtures")
    files = sorted(Path(folder).glob("*.pth"))
    assert files, f"no fixtures in {folder}"
    for f in files:
        fx = torch.load(f, map_location="cpu", weights_only=True)
        model = vitnas.create_model(fx["name"], **fx["kwargs"]).eval()
        model.load_state_dict(fx["state_dict"], strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model(fx["x"]), fx["logits"], atol=1e-4, rtol=1e-4)
