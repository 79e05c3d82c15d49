"""ViTAS search dimensions: the patch size (its own embedding, class token and position embedding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitnas import ArchConfig, SearchSpace, ViTSupernet

SPACE = SearchSpace.preset("cifar").with_(patch_sizes=(2, 4, 8), name="cifar-vitas")


def test_patch_size_is_a_searched_dimension():
    rng = np.random.default_rng(0)
    archs = [SPACE.sample(rng) for _ in range(60)]
    assert {a.patch_size for a in archs} == {2, 4, 8}
    assert all(SPACE.contains(a) for a in archs)
    assert SPACE.size() == 3 * SearchSpace.preset("cifar").size()
    assert SPACE.smallest().patch_size == 8 and SPACE.largest().patch_size == 2
    assert any(SPACE.mutate(archs[0], rng, embed_prob=1.0).patch_size != archs[0].patch_size for _ in range(10))
    bad = ArchConfig(96, 4, (2.0,) * 4, (2,) * 4, patch_size=16)
    with pytest.raises(ValueError, match=r"patch_size=16 is not one of the allowed choices \[2, 4, 8\]"):
        SPACE.check_arch(bad)
    assert ArchConfig.from_dict(archs[0].to_dict()) == archs[0] and archs[0].key().startswith("p")
    # The fixed-patch presets are unchanged.
    assert SearchSpace.preset("autoformer-tiny").patch_sizes is None
    assert "patch_size" not in SearchSpace.preset("autoformer-tiny").sample(rng).to_dict()


def test_supernet_with_patch_sizes_extracts_exactly_and_counts_costs():
    torch.manual_seed(0)
    net = ViTSupernet(SPACE, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    rng = np.random.default_rng(1)
    for p in (2, 4, 8):
        arch = ArchConfig(**{**SPACE.sample(rng).to_dict(), "patch_size": p})
        with torch.no_grad(), net.active(arch):
            want = net(x)
        sub = net.extract(arch)
        assert sub.patch_size == p and sub.pos_embed.shape[1] == (32 // p) ** 2 + 1
        with torch.no_grad():
            torch.testing.assert_close(sub(x), want, atol=1e-5, rtol=0)
        assert net.num_params(arch) == sum(t.numel() for t in sub.parameters())
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            sub(x[:1])
        assert net.num_macs(arch) == counter.get_total_flops() / 2
    small = ArchConfig(96, 4, (2.0,) * 4, (2,) * 4, patch_size=8)
    assert net.num_macs(small) < net.num_macs(ArchConfig(96, 4, (2.0,) * 4, (2,) * 4, patch_size=2)) / 10


def test_only_the_active_patch_size_trains():
    net = ViTSupernet(SPACE, num_classes=10).train()
    net.set_active(ArchConfig(96, 4, (2.0,) * 4, (2,) * 4, patch_size=4))
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert grads["patch_embeds.p4.proj.weight"] is not None and grads["cls_tokens.p4"] is not None
    assert grads["patch_embeds.p8.proj.weight"] is None and grads["pos_embeds.p2"] is None


def test_bilateral_slicing_extracts_exactly_from_either_edge():
    space = SearchSpace.preset("cifar")
    torch.manual_seed(0)
    net = ViTSupernet(space, num_classes=10, irpe={"on": "kv"}).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 32, 32)
    rng = np.random.default_rng(2)
    for arch in [space.sample(rng) for _ in range(4)] + [space.smallest()]:
        outs = {}
        for side in ("left", "right"):
            with torch.no_grad(), net.active(arch, side):
                outs[side] = net(x)
                torch.testing.assert_close(net.extract(arch)(x), outs[side], atol=1e-5, rtol=0)
        assert (outs["left"] - outs["right"]).abs().max() > 1e-3  # different weights
    with torch.no_grad(), net.active(space.largest(), "right"):  # full width: both edges are the whole weight
        full_right = net(x)
    with torch.no_grad(), net.active(space.largest(), "left"):
        torch.testing.assert_close(net(x), full_right)
    assert net.side == "left"
    with pytest.raises(ValueError, match="side='middle'"):
        net.set_active(space.smallest(), "middle")


def test_bilateral_training_alternates_sides_and_evaluation_averages(tmp_path):
    from vitnas.data import load_digits, recipe
    from vitnas.data.augment import eval_transform
    from vitnas.search.evaluator import SupernetEvaluator
    from vitnas.train import TrainConfig, Trainer

    cfg = TrainConfig(
        space="digits",
        recipe="digits",
        val_per_class=20,
        epochs=1,
        batch_size=64,
        bilateral=True,
        out_dir=str(tmp_path),
        threads=1,
        max_steps=4,
    )
    trainer = Trainer(cfg)
    sides = []
    original = trainer.model.set_active
    trainer.model.set_active = lambda arch, side="left": (sides.append(side), original(arch, side))[1]
    trainer.fit()
    assert sides[:4] == ["left", "right", "left", "right"]
    data = load_digits(16, val_per_class=20)
    ev = SupernetEvaluator(trainer.model, data.val, img_size=16, norm=recipe("digits"), bilateral=True)
    arch = SearchSpace.preset(cfg.space).smallest()  # the space the trainer built its supernet on
    r = ev(arch)
    # The expectation, computed another way: each side's extracted subnet scored by hand on the split.
    x, y = eval_transform(data.val.images, 16, recipe("digits")), data.val.labels
    top1, loss = {}, {}
    for side in ("left", "right"):
        with torch.no_grad():
            logits = trainer.model.extract(arch, side).eval()(x).float()
        top1[side] = 100.0 * (logits.argmax(-1) == y).double().mean().item()
        loss[side] = torch.nn.functional.cross_entropy(logits, y).item()
    assert abs(loss["left"] - loss["right"]) > 1e-4  # the sides differ: scoring one side twice would fail below
    assert r["top1_left"] == pytest.approx(top1["left"]) and r["top1_right"] == pytest.approx(top1["right"])
    assert r["top1"] == pytest.approx((top1["left"] + top1["right"]) / 2)
    assert r["loss"] == pytest.approx((loss["left"] + loss["right"]) / 2, abs=1e-4)


def test_private_qk_per_head_count_with_shared_v():
    space = SearchSpace.preset("cifar")
    torch.manual_seed(0)
    net = ViTSupernet(space, num_classes=10, private_qk=True).eval()
    assert set(net.blocks[0].attn.qk.keys()) == {"h2", "h3", "h4"} and not hasattr(net.blocks[0].attn, "qkv")
    x = torch.randn(2, 3, 32, 32)
    rng = np.random.default_rng(3)
    for arch in [space.sample(rng) for _ in range(4)]:
        for side in ("left", "right"):
            with torch.no_grad(), net.active(arch, side):
                torch.testing.assert_close(net.extract(arch)(x), net(x), atol=1e-5, rtol=0)
        assert net.num_params(arch) == sum(p.numel() for p in net.extract(arch).parameters())
    a2 = net.blocks[0].attn.active_params(96, 2)["qkv.weight"]
    a4 = net.blocks[0].attn.active_params(96, 4)["qkv.weight"]
    assert torch.equal(a2[2 * 64 :], a4[2 * 128 : 2 * 128 + 64])  # v: the shared leading rows
    assert not torch.equal(a2[:64], a4[:64])  # q: private to the head count
    with pytest.raises(ValueError, match="num_heads=5 has no private q/k|exceeds"):
        net.set_active(ArchConfig(96, 4, (2.0,) * 4, (2, 5, 2, 2)))
    net.train()
    net.set_active(ArchConfig(96, 4, (2.0,) * 4, (3,) * 4))
    net(x).sum().backward()
    attn = net.blocks[0].attn
    assert attn.qk["h3"].weight.grad is not None and attn.qk["h2"].weight.grad is None


def test_vitas_options_are_opt_in_space_yaml_fields(tmp_path):
    path = tmp_path / "vitas.yaml"
    path.write_text(
        "embed_dim: [96, 128]\ndepth: [4, 5]\nmlp_ratio: [2, 4]\nnum_heads: [2, 4]\nhead_dim: 32\n"
        "img_size: 32\npatch_size: 4\nrel_pos_max: 7\npatch_sizes: [4, 8]\nprivate_qk: true\n"
        "bilateral: true\n"
    )
    space = SearchSpace.from_yaml(path)
    assert space.patch_sizes == (4, 8) and space.private_qk and space.bilateral
    net = ViTSupernet(space, num_classes=10)
    assert net.private_qk == (2, 4) and set(net.patch_embeds.keys()) == {"p4", "p8"}
    for name in ("autoformer-tiny", "autoformer-small", "autoformer-base"):
        preset = SearchSpace.preset(name)
        assert preset.patch_sizes is None and not preset.private_qk and not preset.bilateral


def test_all_vitas_dimensions_together_extract_exactly():
    space = SearchSpace.preset("cifar").with_(patch_sizes=(4, 8), private_qk=True, bilateral=True)
    torch.manual_seed(0)
    net = ViTSupernet(space, num_classes=10, irpe={"on": "k"}).eval()
    x = torch.randn(2, 3, 32, 32)
    rng = np.random.default_rng(4)
    for arch in [space.sample(rng) for _ in range(4)]:
        for side in ("left", "right"):
            with torch.no_grad(), net.active(arch, side):
                torch.testing.assert_close(net.extract(arch)(x), net(x), atol=1e-5, rtol=0)
