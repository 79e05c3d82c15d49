from __future__ import annotations

import pytest
import torch

import vitnas
from vitnas.costs.macs import count_macs
from vitnas.models.clip import CLIP

PARAMS = {
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_tiny_patch16_224_ctx_product_50_shared_k": 5_755_816,
    "deit_small_patch16_224_ctx_product_50_shared_k": 22_089_064,
    "deit_small_patch16_224_ctx_product_50_shared_qk": 22_127_464,
    "deit_small_patch16_224_ctx_product_50_shared_qkv": 22_165_864,
    "deit_base_patch16_224_ctx_product_50_shared_k": 86_606_056,
    "deit_base_patch16_224_ctx_product_50_shared_qkv": 86_682_856,
    "autoformer_tiny": 5_867_944,
}


@pytest.mark.parametrize("name,expected", sorted(PARAMS.items()))
def test_published_parameter_counts(name, expected):
    with torch.device("meta"):
        model = vitnas.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_autoformer_small_and_base_sizes():
    for name, want in (("autoformer_small", 22.89e6), ("autoformer_base", 53.69e6)):
        with torch.device("meta"):
            model = vitnas.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(want, abs=0.005e6)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if "base" in n or n.endswith(("_384", "_512")) else n
        for n in vitnas.list_models()
    ],
)
def test_every_registered_model_runs_and_trains(name):
    """Base-size and high-resolution variants (slow on 2 cores) run with `make test-all`."""
    with torch.device("meta"):
        if isinstance(vitnas.create_model(name), CLIP):
            pytest.skip("a CLIP has no classifier head; tests/test_clip_task.py checks every registered CLIP model")
    torch.manual_seed(0)
    # a 2x2 grid keeps it cheap; every model takes drop_path_rate (what `vitnas retrain --model` passes)
    model = vitnas.create_model(name, num_classes=7, img_size=32, drop_path_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape[0] == 2
    aux = getattr(model, "aux_logits", None)  # an auxiliary head trains through its own loss term (DARTS)
    (y.sum() + (aux.sum() if aux is not None else 0)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_registry_errors_and_listing():
    assert "deit_small_patch16_224_ctx_cross_56_shared_k" in vitnas.list_models("deit_small*")
    with pytest.raises(ValueError, match="unknown model 'deit_huge'"):
        vitnas.create_model("deit_huge")


def macs_of(name: str) -> float:
    """MACs of one image at the model's own input size, counted on the meta device (no arithmetic runs)."""
    return count_macs(name)


# Published MACs in millions, with half the unit of the published rounding (1.3G means 1250-1350M).
# DeiT: DeiT paper, table 1. AutoFormer: paper. iRPE: iRPE README. EfficientViT: paper, table 2.
# TinyViT: README (21M-384: 13.8G, 21M-512: 27.0G).
PUBLISHED_MACS = {
    "deit_tiny_patch16_224": (1300, 50),
    "deit_small_patch16_224": (4600, 50),
    "deit_base_patch16_224": (17600, 50),
    "autoformer_tiny": (1300, 50),
    "autoformer_base": (11000, 500),
    "deit_tiny_patch16_224_ctx_product_50_shared_k": (1284, 0.5),
    "deit_small_patch16_224_ctx_product_50_shared_k": (4659, 0.5),
    "deit_small_patch16_224_ctx_product_50_shared_qk": (4706, 0.5),
    "deit_base_patch16_224_ctx_product_50_shared_k": (17684, 0.5),
    "deit_base_patch16_224_ctx_product_50_shared_qkv": (18137, 0.5),
    "efficientvit_m0": (79, 0.5),
    "efficientvit_m1": (167, 0.5),
    "efficientvit_m2": (201, 0.5),
    "efficientvit_m3": (263, 0.5),
    "efficientvit_m4": (299, 0.5),
    "efficientvit_m5": (522, 0.5),
    "tiny_vit_5m_224": (1300, 50),
    "tiny_vit_11m_224": (2000, 50),
    "tiny_vit_21m_224": (4300, 50),
    "tiny_vit_21m_384": (13800, 50),
    "tiny_vit_21m_512": (27000, 50),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MACS))
def test_macs_within_3_percent_of_published(name):
    published, rounding = PUBLISHED_MACS[name]
    got = macs_of(name) / 1e6
    assert abs(got - published) <= max(0.03 * published, rounding), (got, published)


def test_macs_where_the_published_figure_counts_differently():
    """Two published figures sit just outside 3%, for reasons the counts themselves show.

    AutoFormer-S: the paper says 5.1G, but the reference code's own `get_complexity(196)` gives 4.892G,
    which we match. DeiT-S + iRPE on q, k and v: the published 4885M counts the value term per (query, key)
    pair, L*L*head_dim per head; we gather attention into the 50 buckets first, L*50*head_dim. Adding the
    difference back recovers the published figure."""
    assert macs_of("autoformer_small") == pytest.approx(4.892e9, rel=1e-3)
    got = macs_of("deit_small_patch16_224_ctx_product_50_shared_qkv")
    tokens, buckets, heads, head_dim, depth = 197, 50, 6, 64, 12
    per_pair_extra = depth * heads * tokens * (tokens - buckets) * head_dim
    assert (got + per_pair_extra) / 1e6 == pytest.approx(4885, rel=0.005)
    assert got / 1e6 < 4885  # and ours is the cheaper form


# The reference implementations' state dicts, summarized: (number of keys, sha256 of the sorted lines
# "key (shape)" of reference_model.state_dict()), taken by running microsoft/Cream's code outside the repo
# (EfficientViT/classification, TinyViT, MiniViT/Mini-DeiT, AutoFormerV2). Equal digests mean the same keys
# with the same shapes, so reference checkpoints load with strict=True.
REFERENCE_STATE_DICTS = {
    "efficientvit_m0": (699, "b8410909f66d15a3406e17a3601ee1f377d8f2117826294b27efe5bebf753d33"),
    "tiny_vit_5m_224": (296, "09e88aa32bcbe51de38109f37546c9a2f811a521adda4c5c9b2e500614004843"),
    "mini_deit_tiny_patch16_224": (139, "9cf65b296aabe657698639988deaef82528acf2b2bd3132a8806ac62cb4e8ae6"),
    "s3_tiny": (187, "420978df8c55e266744244e64aee8679a03940a6ceefc9461fe3e3c4fc3d1625"),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_STATE_DICTS))
def test_state_dict_keys_and_shapes_equal_the_reference(name):
    import hashlib

    with torch.device("meta"):
        sd = vitnas.create_model(name).state_dict()
    lines = sorted(f"{k} {tuple(v.shape)}".replace(", ", ",") for k, v in sd.items())
    assert (len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()) == REFERENCE_STATE_DICTS[name]


def test_load_weights_from_reference_style_checkpoints(tmp_path):
    """A reference-style .pth ({'model': sd, 'args': Namespace}, DDP 'module.' prefix) loads into a model
    with another number of classes: everything but the classifier is copied, the classifier starts fresh."""
    import argparse

    from safetensors.torch import save_file

    from vitnas.models import load_weights

    torch.manual_seed(0)
    src = vitnas.create_model("efficientvit_m0", num_classes=1000, img_size=64)
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3), "epoch": 299}, tmp_path / "ref.pth")
    dst = vitnas.create_model("efficientvit_m0", num_classes=10, img_size=64)
    fresh_head = dst.head.l.weight.detach().clone()
    report = load_weights(dst, tmp_path / "ref.pth")
    assert report["skipped"] == ["head.l.weight", "head.l.bias"]
    conv = "blocks1.0.mixer.m.attn.qkvs.0.c.weight"
    torch.testing.assert_close(dst.state_dict()[conv], src.state_dict()[conv])
    torch.testing.assert_close(dst.head.bn.running_var, src.head.bn.running_var)  # 1-D, same shape: loaded
    assert torch.equal(dst.head.l.weight, fresh_head)

    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    same = vitnas.create_model("efficientvit_m0", num_classes=1000, img_size=64)
    assert load_weights(same, tmp_path / "w.safetensors")["skipped"] == []

    wide = dict(src.state_dict())
    wide["patch_embed.0.c.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match=r"patch_embed.0.c.weight has shape \(16, 3, 3, 3\), the model expects"):
        load_weights(vitnas.create_model("efficientvit_m0", img_size=64), wide)
    with pytest.raises(ValueError, match="keys do not match EfficientViT"):
        load_weights(vitnas.create_model("efficientvit_m1", img_size=64), tmp_path / "w.safetensors")
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad.pth: expected a state dict, or one under \['model'"):
        load_weights(dst, tmp_path / "bad.pth")

    import fractions

    torch.save({"model": sd, "x": fractions.Fraction(1, 3)}, tmp_path / "evil.pth")  # a global nobody allowed
    with pytest.raises(ValueError, match="weights-only loading"):
        load_weights(dst, tmp_path / "evil.pth")


@pytest.mark.parametrize(
    "name,trained,target",
    [
        ("efficientvit_m0", 224, 64),  # attention_biases (heads, 7*7) -> (heads, 4*4); index buffers kept
        ("mini_deit_tiny_patch16_224", 224, 32),  # pos_embed, no class token: 14x14 -> 2x2 grid
        ("deit_tiny_patch16_224", 224, 64),  # pos_embed with the class token
        ("s3_tiny", 224, 64),  # relative_position_bias_table of clipped windows, attn_mask / index buffers
        ("tiny_vit_5m_224", 224, 64),  # windows do not depend on the image size: loads as it is
    ],
)
def test_weights_trained_at_another_image_size_are_adapted(name, trained, target):
    from vitnas.models import load_weights

    torch.manual_seed(0)
    src = vitnas.create_model(name, img_size=trained)
    dst = vitnas.create_model(name, img_size=target, num_classes=5).eval()
    report = load_weights(dst, src.state_dict())
    assert all(
        k.split(".")[-1] in ("pos_embed", "attention_biases", "relative_position_bias_table") for k in report["resized"]
    )
    assert (report["resized"] != []) == (name != "tiny_vit_5m_224")
    own, theirs = dst.state_dict(), src.state_dict()
    same = [k for k in theirs if k not in report["resized"] + report["skipped"]]
    assert all(torch.equal(own[k], theirs[k]) for k in same)
    with torch.no_grad():
        assert torch.isfinite(dst(torch.randn(2, 3, target, target))).all()


def test_resampling_a_position_table_to_its_own_size_is_the_identity():
    from vitnas.models.weights import resize_position_table

    torch.manual_seed(0)
    table = torch.randn(13 * 13, 3)
    grown = resize_position_table("x.relative_position_bias_table", table, torch.Size([27 * 27, 3]))
    assert grown.shape == (27 * 27, 3)
    pos = torch.randn(1, 1 + 14 * 14, 8)
    back = resize_position_table("pos_embed", pos, torch.Size([1, 1 + 14 * 14, 8]))
    torch.testing.assert_close(back, pos)  # bicubic, align_corners=False, same size: unchanged
    assert resize_position_table("blocks.0.mlp.fc1.weight", table, torch.Size([27 * 27, 3])) is None
    # a smaller window keeps the entries of the offsets it still has
    small = resize_position_table("x.relative_position_bias_table", table, torch.Size([7 * 7, 3]))
    torch.testing.assert_close(small.t().reshape(3, 7, 7), table.t().reshape(3, 13, 13)[:, 3:10, 3:10])
    biases = torch.randn(4, 7 * 7)
    cropped = resize_position_table("attn.attention_biases", biases, torch.Size([4, 16]))
    torch.testing.assert_close(cropped.reshape(4, 4, 4), biases.reshape(4, 7, 7)[:, :4, :4])
