"""Cream (NeurIPS'20): the MBConv search space, its single-path supernet and the released child models."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitnas
from vitnas.costs.macs import count_macs
from vitnas.export import export_onnx
from vitnas.models.cream import CreamNet, cream_macs, cream_params
from vitnas.models.spec import build, spec_of
from vitnas.space.mbconv import CREAM_PRE_PROB, MBConvArch, MBConvSpace
from vitnas.supernet.mbconv import MBConvSupernet

# The released models, 1000 classes at their input sizes. Parameters, MACs and the sha256 of the sorted
# "key:shape" lines of the state dict were computed from the reference itself: microsoft/Cream's
# `gen_childnet` (Cream/lib/models/structures/childnet.py) fed tools/retrain.py's arch lists and pool strings,
# on timm 0.1.20's efficientnet_blocks; MACs by torch.utils.flop_counter (convs + classifier). Published
# FLOPs 14/43/114/287/481/604M; REFERENCE-methods.md: 2.67/4.40/4.41/6.04/7.71/9.70M, 13.2 ... 578.7M MACs.
RELEASED = {
    14: (2_673_096, 13_188_608, "62137a60a7b027e1bdc494552ae670418b3d75324bc8ec442ce5b726c7cc7be3"),
    43: (4_398_600, 40_655_232, "0f674734bbf5459114fa5f48c37b9db708cc5b66b466c1af805a7c03b434af0e"),
    114: (4_410_120, 109_623_680, "e861cf0d7d1333c451d5540e690f25b64d0290155b254cd7de88715204c0838a"),
    287: (6_044_368, 276_262_016, "60813cec36580c59e45cfb177045505061463fe467f675cdf15f31b9b4b53da5"),
    481: (7_713_360, 460_398_080, "e48dfbd02a72e5b19b9f4e0f04eba76f4863f8b2302c26b6d1dffe94f5eeb86a"),
    604: (9_695_624, 578_698_368, "85d9687425142d3e107391368739104039c6c08446f71e036dcc522399b17dd0"),
}


def _digest(model: torch.nn.Module) -> str:
    lines = sorted(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _counted_macs(config: dict) -> int:
    """FlopCounterMode MACs of one image through `CreamNet(**config)`, on the meta device."""
    with torch.device("meta"):
        model = CreamNet(**config).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, config["in_chans"], config["img_size"], config["img_size"]))
    return counter.get_total_flops() // 2


def _randomize_batchnorms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine parameters and running statistics, so equalities test the BNs too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.3 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- released models -------------------------------------------------------------------------------
@pytest.mark.parametrize("flops", sorted(RELEASED))
def test_released_models_match_the_reference(flops):
    params, macs, digest = RELEASED[flops]
    with torch.device("meta"):
        model = vitnas.create_model(f"cream_{flops}")
    assert _n_params(model) == params == cream_params(model.config)
    assert _digest(model) == digest
    assert count_macs(f"cream_{flops}") == macs == cream_macs(model.config)


def test_reference_key_names_and_the_one_block_stage_quirk():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in vitnas.create_model("cream_14").state_dict().items()}
    assert shapes["conv_stem.weight"] == (16, 3, 3, 3)
    assert shapes["blocks.0.0.conv_dw.weight"] == (16, 1, 3, 3)
    assert shapes["blocks.0.0.se.conv_reduce.weight"] == (8, 16, 1, 1)  # make_divisible(16 * 0.25, 8)
    assert shapes["blocks.1.0.conv_pw.weight"] == (64, 16, 1, 1)
    assert shapes["blocks.1.0.se.conv_reduce.weight"] == (16, 64, 1, 1)  # squeeze on the expanded width
    assert shapes["blocks.1.0.se.conv_expand.bias"] == (64,)
    assert shapes["blocks.1.0.conv_pwl.weight"] == (24, 64, 1, 1)
    assert {f"blocks.1.0.bn{i}.running_var" for i in (1, 2, 3)} <= set(shapes)
    # choice 3 is k5 e6, but a 1-block stage keeps its pool default: k3e4, k3e6, k5e6 in stages 1, 4, 5
    assert shapes["blocks.1.0.conv_dw.weight"] == (64, 1, 3, 3)
    assert shapes["blocks.4.0.conv_dw.weight"] == (480, 1, 3, 3)
    assert shapes["blocks.5.0.conv_dw.weight"] == (576, 1, 5, 5)
    assert shapes["blocks.2.1.conv_dw.weight"] == (240, 1, 5, 5)  # 2-block stages take the choice
    assert shapes["blocks.6.0.conv.weight"] == (320, 192, 1, 1)
    assert shapes["conv_head.weight"] == (1280, 320, 1, 1) and shapes["conv_head.bias"] == (1280,)
    assert shapes["classifier.weight"] == (1000, 1280)


def test_create_model_trains_at_cifar_size():
    model = vitnas.create_model("cream_14", num_classes=7, img_size=32, drop_path_rate=0.1).train()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.forward_head(model.forward_features(torch.randn(2, 3, 32, 32)), pre_logits=True).shape == (2, 1280)


def test_fuse_folds_every_batchnorm_and_keeps_outputs():
    model = vitnas.create_model("cream_14", num_classes=10)
    _randomize_batchnorms(model)
    model.eval()
    fused = copy.deepcopy(model).fuse()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-4)


# -- supernet --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_supernet():
    torch.manual_seed(0)
    net = MBConvSupernet(MBConvSpace.preset("cream-cifar"), num_classes=10, drop_path_rate=0.1)
    _randomize_batchnorms(net)
    return net.eval()


def test_extracted_subnets_equal_the_supernet_and_its_costs(cifar_supernet):
    net, rng = cifar_supernet, np.random.default_rng(0)
    x = torch.randn(2, 3, 32, 32)
    archs = [net.space.smallest(), net.space.largest()] + [net.space.sample(rng) for _ in range(18)]
    for arch in archs:
        sub = net.extract(arch)
        assert not sub.training
        with torch.no_grad(), net.active(arch):
            torch.testing.assert_close(sub(x), net(x), atol=1e-5, rtol=1e-5)
        assert net.num_params(arch) == _n_params(sub)
        assert net.num_macs(arch) == _counted_macs(sub.config)
    assert net.num_macs(archs[0], img_size=64) == _counted_macs({**net.extract(archs[0]).config, "img_size": 64})


def test_extract_carries_the_supernet_drop_path_rates_and_train_mode(cifar_supernet):
    net = cifar_supernet
    arch = MBConvArch(((0,), (1, 2), (3,), (4, 5), (5,)))
    rates = net.drop_path_rates
    # layer j of stage s keeps the rate of its supernet position (capacity 2 per stage)
    assert net.extract(arch).config["drop_path_rate"] == [
        rates[0],
        rates[2],
        rates[3],
        rates[4],
        rates[6],
        rates[7],
        rates[8],
    ]
    net.train()
    try:
        sub = net.extract(arch)
        assert sub.training
    finally:
        net.eval()


def test_active_restores_and_capacity_is_checked(cifar_supernet):
    net = cifar_supernet
    before = net.arch
    small = net.space.smallest()
    with net.active(small, side="right"):
        assert net.arch == small
    assert net.arch == before
    with pytest.raises(ValueError, match=r"stages\[2\] has depth 3, above the supernet's max_depths\[2\]=2"):
        net.set_active(MBConvArch(((0,), (0,), (0, 0, 0), (0,), (0,))))
    with pytest.raises(ValueError, match=r"stages\[0\]\[0\]=6 is not an op index"):
        net.set_active(MBConvArch(((6,), (0,), (0,), (0,), (0,))))
    with pytest.raises(TypeError, match="MBConvArch"):
        net.set_active(vitnas.space.ArchConfig(64, 2, 2.0, 2))
    assert net.arch == before


def test_cream_supernet_extracts_at_224_costs():
    """The reference space (30M parameters); forward at 64 px to stay fast, costs at 224."""
    torch.manual_seed(0)
    net = MBConvSupernet(MBConvSpace.preset("cream"))
    assert net.max_depth == 20 and len(net.drop_path_rates) == 20
    _randomize_batchnorms(net, seed=1)
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    rng = np.random.default_rng(1)
    for arch in (net.space.largest(), net.space.sample(rng), net.space.sample(rng)):
        sub = net.extract(arch)
        with torch.no_grad(), net.active(arch):
            torch.testing.assert_close(sub(x), net(x), atol=1e-5, rtol=1e-5)
        assert net.num_params(arch) == _n_params(sub)
        assert net.num_macs(arch) == _counted_macs(sub.config)


def test_spec_round_trips_supernet_and_subnet(cifar_supernet):
    net = cifar_supernet
    spec = spec_of(net)
    assert spec["kind"] == "mbconv_supernet"
    rebuilt = build(spec, meta_device=True)
    assert isinstance(rebuilt, MBConvSupernet) and rebuilt.space == net.space
    assert rebuilt.init_kwargs == net.init_kwargs and rebuilt.drop_path_rates == net.drop_path_rates
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    sub = net.extract(net.space.sample(np.random.default_rng(3)))
    spec = spec_of(sub)
    assert spec["kind"] == "cream"
    again = build(spec)
    again.load_state_dict(sub.state_dict(), strict=True)
    assert again.config == sub.config


def test_onnx_export_of_an_extracted_subnet(cifar_supernet, tmp_path):
    sub = cifar_supernet.extract(cifar_supernet.space.sample(np.random.default_rng(5)))
    assert export_onnx(sub, tmp_path / "model.onnx", atol=1e-4) < 1e-4


# -- space -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cream", "cream-cifar"])
def test_sample_mutate_crossover_stay_in_the_space(name):
    space = MBConvSpace.preset(name)
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(50)]
    assert len({a.key() for a in archs}) > 40
    for a, b in zip(archs, archs[1:]):
        assert a in space
        assert space.mutate(a, rng, layer_prob=0.5, depth_prob=1.0, embed_prob=0.4) in space
        assert space.check_arch(space.crossover(a, b, rng)) in space
    assert space.smallest() in space and space.largest() in space


def test_space_values():
    space = MBConvSpace.preset("cream")
    assert space.op_prob == CREAM_PRE_PROB and space.max_depths == (4, 4, 4, 4, 4)
    assert space.size() == (6 + 6**2 + 6**3 + 6**4) ** 5
    assert space.smallest() == MBConvArch(((0,),) * 5) and space.largest() == MBConvArch(((5,) * 4,) * 5)
    cifar = MBConvSpace.preset("cream-cifar")
    assert cifar.size() == (6 + 36) ** 5 and cifar.img_size == 32
    assert set(MBConvSpace.presets()) == {"cream", "cream-cifar"}
    fixed = space.with_(depths=(4, 4, 4, 4, 4), max_depths=(4, 4, 5, 4, 4))  # the reference supernet's layout
    assert fixed.depths == ((4,),) * 5 and fixed.size() == 6**20
    assert fixed.capacity_violations(MBConvArch(((0,) * 4, (0,) * 4, (0,) * 5, (0,) * 4, (0,) * 4))) == []
    with pytest.raises(ValueError, match=r"stages\[2\] has depth 5, not one of the allowed choices \[4\]"):
        fixed.check_arch(MBConvArch(((0,) * 4, (0,) * 4, (0,) * 5, (0,) * 4, (0,) * 4)), source="x.yaml")
    for bad, match in [
        (dict(strides=(2, 2, 3, 1, 2)), "strides must be 1 or 2"),
        (dict(ops=((4, 4),)), r"ops\[0\] kernel must be odd"),
        (dict(channels=(24, 40)), "strides has 5 stages, channels has 2"),
        (dict(max_depths=(4, 4, 3, 4, 4)), r"max_depths\[2\]=3 is smaller"),
        (dict(op_prob=(0.5, 0.5)), "op_prob has 2 entries"),
    ]:
        with pytest.raises(ValueError, match=match):
            space.with_(**bad)


def test_yaml_round_trips_and_errors_name_the_key(tmp_path):
    space = MBConvSpace.preset("cream-cifar")
    path = tmp_path / "space.yaml"
    space.to_yaml(path)
    assert MBConvSpace.from_yaml(path) == space
    assert MBConvSpace(**space.to_dict()) == space
    arch = space.sample(np.random.default_rng(0))
    arch.to_yaml(tmp_path / "arch.yaml")
    assert MBConvArch.from_yaml(tmp_path / "arch.yaml") == arch
    (tmp_path / "wrapped.yaml").write_text(f"arch:\n  stages: {arch.to_dict()['stages']}\n")
    assert MBConvArch.from_yaml(tmp_path / "wrapped.yaml") == arch
    assert MBConvArch.from_json(arch.to_json()) == arch == space.arch_from_dict(arch.to_dict())
    assert str(arch) == arch.key() and arch.depth == sum(arch.depths)

    (tmp_path / "bad_key.yaml").write_text("stages: [[0], [1]]\nwidth: 3\n")
    with pytest.raises(ValueError, match=r"bad_key.yaml: unknown key 'width'"):
        MBConvArch.from_yaml(tmp_path / "bad_key.yaml")
    (tmp_path / "bad_op.yaml").write_text("stages: [[0], [1, -2]]\n")
    with pytest.raises(ValueError, match=r"bad_op.yaml: stages\[1\]\[1\] must be an integer >= 0, got -2"):
        MBConvArch.from_yaml(tmp_path / "bad_op.yaml")
    (tmp_path / "empty.yaml").write_text("stages: [[0], []]\n")
    with pytest.raises(ValueError, match=r"stages\[1\] is empty"):
        MBConvArch.from_yaml(tmp_path / "empty.yaml")
    (tmp_path / "bad_space.yaml").write_text("space:\n  channels: [16, 24]\n  depth: [1, 2]\n")
    with pytest.raises(ValueError, match=r"bad_space.yaml: unknown key 'depth'"):
        MBConvSpace.from_yaml(tmp_path / "bad_space.yaml")
    (tmp_path / "bad_value.yaml").write_text("se_ratio: 2\n")
    with pytest.raises(ValueError, match=r"bad_value.yaml: se_ratio must be a number in \[0, 1\]"):
        MBConvSpace.from_yaml(tmp_path / "bad_value.yaml")
