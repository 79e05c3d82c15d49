"""iRPE bucket ids against the reference's numbers, and the efficient products against per-pair sums."""

from __future__ import annotations

import pytest
import torch

from vitnas.nn.irpe import IRPE, IRPEConfig, build_irpe, irpe_bucket_ids, num_buckets, piecewise_index


def test_piecewise_index_rounding():
    d = torch.arange(-13, 14)
    got = piecewise_index(d, 1.9, 3.8, 15.2).tolist()
    assert got == [-3] * 10 + [-2, -2, -1, 0, 1, 2, 2] + [3] * 10  # a rounded 4 is clipped to 3.8, then truncated


def test_product_bucket_ids_match_the_reference_on_14x14_plus_cls():
    ids = irpe_bucket_ids(IRPEConfig(), (14, 14))
    assert ids.shape == (197, 197) and num_buckets(IRPEConfig()) == 50
    assert (ids[0] == 49).all() and (ids[:, 0] == 49).all()
    assert ids[1, :20].tolist() == [49, 24, 23, 22, 22, 21, 21, 21, 21, 21, 21, 21, 21, 21, 21, 17, 16, 15, 15, 14]
    assert ids[1, 15:30].tolist() == [17, 16, 15, 15, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 10]
    q77 = 1 + 7 * 14 + 7
    assert ids[q77, 1 + 7 * 14 : 1 + 8 * 14].tolist() == [27, 27, 27, 27, 26, 26, 25, 24, 23, 22, 22, 21, 21, 21]
    assert ids[q77, 1] == 48 and ids[1, q77] == 0


@pytest.mark.parametrize(
    "method,ratio,allocated,used",
    [("product", 1.9, 50, 50), ("euc", 20, 82, 20), ("quant", 33, 134, 51), ("cross", 20, 82, 28)],
)
def test_bucket_counts_of_the_published_models(method, ratio, allocated, used):
    """The '_N' of the reference's model names is the number of buckets a 14x14 grid + cls uses."""
    cfg = IRPEConfig(method=method, ratio=ratio)
    assert num_buckets(cfg) == allocated
    ids = irpe_bucket_ids(cfg, (14, 14), part="rows" if method == "cross" else "")
    assert len(ids.unique()) == used and ids.max() < allocated


def pair_tables(module: IRPE, ids: torch.Tensor) -> torch.Tensor:
    """Per-pair embeddings (Hn, L, L, d) or biases (Hn, L, L): the slow definition."""
    if module.cfg.mode == "bias":
        return module.lookup_table_bias[:, ids]
    w = module.lookup_table_weight
    return (w.transpose(1, 2) if module.transposed else w)[:, ids]  # (Hn, L, L, d); Hn broadcasts over heads


@pytest.mark.parametrize("method", ["euc", "quant", "cross", "product"])
@pytest.mark.parametrize("mode,on", [("contextual", "qkv"), ("bias", "qk")])
@pytest.mark.parametrize("shared", [True, False])
def test_efficient_forms_equal_per_pair_sums(method, mode, on, shared):
    torch.manual_seed(0)
    cfg = IRPEConfig(method=method, mode=mode, ratio=1.9 if method == "product" else 2.0, shared_head=shared, on=on)
    H, d, B, grid = 3, 8, 2, (3, 5)  # a non-square grid
    L = 1 + grid[0] * grid[1]
    modules = build_irpe(cfg, d, H)
    assert set(modules) == {f"rpe_{c}" for c in on}
    for name, module in modules.items():
        for p in module.parameters():
            torch.nn.init.normal_(p)
        parts = [module.rp_rows, module.rp_cols] if method == "cross" else [module]
        if name == "rpe_v":
            x = torch.randn(B, H, L, L).softmax(-1).requires_grad_()
            want = sum((x.unsqueeze(-1) * pair_tables(m, m.ids(L, grid, x.device)).unsqueeze(0)).sum(3) for m in parts)
        else:
            x = torch.randn(B, H, L, d, requires_grad=True)
            if mode == "bias":
                want = sum(pair_tables(m, m.ids(L, grid, x.device)).unsqueeze(0).expand(B, H, L, L) for m in parts)
            else:
                want = sum(
                    (x.unsqueeze(3) * pair_tables(m, m.ids(L, grid, x.device)).unsqueeze(0)).sum(-1) for m in parts
                )
        got = module(x, grid)
        torch.testing.assert_close(got.expand_as(want), want, atol=1e-4, rtol=1e-4)
        got.sum().backward()
        for p in module.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0  # gradients reach every table


def test_table_shapes_and_errors():
    m = build_irpe(IRPEConfig(on="qkv", shared_head=False), 64, 6)
    assert m["rpe_q"].lookup_table_weight.shape == (6, 64, 50)
    assert m["rpe_v"].lookup_table_weight.shape == (6, 50, 64)
    assert not m["rpe_k"].lookup_table_weight.detach().any()  # tables start at zero
    assert build_irpe(IRPEConfig(mode="bias", on="k"), 64, 6)["rpe_k"].lookup_table_bias.shape == (1, 50)
    with pytest.raises(ValueError, match="bias mode applies to q and k only"):
        IRPEConfig(mode="bias", on="v")
    with pytest.raises(ValueError, match="method='polar'"):
        IRPEConfig(method="polar")
    with pytest.raises(ValueError, match="skip=1 non-patch tokens"):
        m["rpe_k"](torch.randn(1, 6, 16, 64), (4, 4))


DEIT = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def deit(size: str, on: str | None, **kw):
    e, h = DEIT[size]
    return dict(
        embed_dim=e,
        depth=12,
        num_heads=h,
        mlp_ratios=4.0,
        rel_pos=False,
        global_pool="token",
        norm_eps=1e-6,
        irpe={"on": on} if on else None,
        **kw,
    )


@pytest.mark.parametrize(
    "size,on,expected",
    [
        ("tiny", "k", 5_755_816),
        ("small", "k", 22_089_064),
        ("small", "qk", 22_127_464),
        ("small", "qkv", 22_165_864),
        ("base", "k", 86_606_056),
        ("base", "qkv", 86_682_856),
    ],
)
def test_deit_with_irpe_parameter_counts(size, on, expected):
    """DeiT + contextual product shared-head iRPE (50 buckets): 5.76M, 22.09/22.13/22.17M, 86.61/86.68M."""
    from vitnas.costs import ViTCostModel
    from vitnas.models.vit import VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer(**deit(size, on))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert ViTCostModel(rel_pos_max=None, irpe={"on": on}).params(model.arch) == expected
    assert "blocks.0.attn.rpe_k.lookup_table_weight" in model.state_dict()


def test_irpe_in_the_model_forward_and_macs():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from vitnas.costs import ViTCostModel
    from vitnas.models.vit import VisionTransformer

    torch.manual_seed(0)
    kw = dict(
        img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratios=2.0, rel_pos=False, num_classes=5
    )
    plain = VisionTransformer(**kw).eval()
    model = VisionTransformer(**kw, irpe={"on": "qkv", "method": "cross", "ratio": 1.0}).eval()
    model.load_state_dict(plain.state_dict(), strict=False)  # iRPE tables stay at zero
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)  # zero tables: no change
        for name, p in model.named_parameters():
            if "rpe_" in name:
                p.normal_()
        assert (model(x) - plain(x)).abs().max() > 1e-3
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x[:1])
    cm = ViTCostModel(img_size=64, num_classes=5, rel_pos_max=None, irpe={"on": "qkv", "method": "cross", "ratio": 1.0})
    assert cm.macs(model.arch) == counter.get_total_flops() / 2
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "rpe_" in n)


@pytest.mark.parametrize(
    "irpe",
    [
        {"on": "qkv", "shared_head": False},
        {"on": "k"},
        {"on": "qk", "mode": "bias", "shared_head": False},
        {"on": "kv", "method": "cross", "ratio": 1.0},
    ],
)
def test_supernet_with_irpe_extracts_exactly(irpe):
    import numpy as np

    from vitnas import SearchSpace, ViTSupernet

    space = SearchSpace.preset("cifar")
    torch.manual_seed(0)
    net = ViTSupernet(space, num_classes=10, irpe=irpe).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "rpe_" in name:
                p.normal_()
    x = torch.randn(2, 3, 32, 32)
    rng = np.random.default_rng(0)
    for arch in [space.sample(rng) for _ in range(4)] + [space.smallest()]:
        with torch.no_grad(), net.active(arch):
            want = net(x)
        sub = net.extract(arch)
        torch.testing.assert_close(sub(x), want, atol=1e-5, rtol=0)
        assert net.num_params(arch) == sum(p.numel() for p in sub.parameters())
    net.train()
    net.set_active(space.largest())
    net(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if "rpe_" in n)


# Checksums of the bucket ids that the reference code (microsoft/Cream iRPE/DeiT-with-iRPE/irpe.py,
# get_bucket_ids_2d with skip=1 on a 14x14 grid) produces: (sum of ids, sum of ids x weights).
REFERENCE_CHECKSUMS = [
    ("euc", 20, "", 1845765, 8934083167),
    ("quant", 33, "", 3961617, 19196011269),
    ("product", 1.9, "", 941241, 4761949025),
    ("cross", 20, "rows", 1568473, 7662595380),
    ("cross", 20, "cols", 1568473, 7604232620),
    ("euc", 1.9, "", 225595, 1095387847),
    ("quant", 2.5, "", 375331, 1823045250),
]


@pytest.mark.parametrize("method,ratio,part,total,weighted", REFERENCE_CHECKSUMS)
def test_bucket_ids_of_every_method_match_the_reference(method, ratio, part, total, weighted):
    ids = irpe_bucket_ids(IRPEConfig(method=method, ratio=ratio), (14, 14), part=part)
    w = torch.arange(197 * 197).view(197, 197) % 9973
    assert int(ids.sum()) == total and int((ids * w).sum()) == weighted


def test_latency_table_blocks_carry_irpe(tmp_path):
    """The latency table builds its blocks from the models' ViTConfig, so iRPE is timed (and keyed) too."""
    from vitnas import SearchSpace, ViTSupernet
    from vitnas.costs.latency import LatencyTable
    from vitnas.models.vit import build_block

    space = SearchSpace.preset("digits")
    net = ViTSupernet(space, num_classes=10, irpe={"on": "k"})
    block = build_block(net.vit_config, 32, 2, 64)
    assert hasattr(block.attn, "rpe_k")
    assert net.extract(space.smallest()).blocks[0].attn.rpe_k is not None
    table = LatencyTable.build(space, net.vit_config, cache_dir=tmp_path, reps=1, warmup=0)
    assert table.meta["model"]["irpe"] == {"on": "k"}
    assert LatencyTable.build(space, net.model_kwargs, cache_dir=tmp_path).entries == table.entries  # same key
    assert len(list(tmp_path.iterdir())) == 1
