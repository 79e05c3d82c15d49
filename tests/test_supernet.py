from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitnas import ArchConfig, SearchSpace, VisionTransformer, ViTSupernet

AUTOFORMER = ["autoformer-tiny", "autoformer-small", "autoformer-base"]
# The published subnets (AutoFormer's experiments/subnet/AutoFormer-{T,S,B}.yaml).
PUBLISHED = {
    "autoformer-tiny": ArchConfig(
        192, 13, (3.5, 3.5, 3.0, 3.5, 3.0, 3.0, 4.0, 4.0, 3.5, 4.0, 3.5, 4.0, 3.5), (3,) * 10 + (4, 3, 3)
    ),
    "autoformer-small": ArchConfig(
        384,
        13,
        (3.0, 3.5, 3.0, 3.5, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.5, 4.0),
        (6, 6, 5, 7, 5, 5, 5, 6, 6, 7, 7, 6, 7),
    ),
    "autoformer-base": ArchConfig(
        576,
        14,
        (3.5, 3.5, 4.0, 3.5, 4.0, 3.5, 3.5, 3.0, 4.0, 4.0, 3.0, 4.0, 3.0, 3.5),
        (9, 9, 9, 9, 9, 10, 9, 9, 10, 9, 10, 9, 9, 10),
    ),
}


def randomize_(net: torch.nn.Module) -> None:
    """Non-trivial values everywhere (LayerNorms, biases, tables), so slicing mistakes show."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02 if p.ndim > 1 else 0.5).add_(1.0 if p.ndim == 1 else 0.0)


@pytest.fixture(scope="module", params=AUTOFORMER + ["cifar"])
def supernet(request):
    space = SearchSpace.preset(request.param)
    # The weights do not depend on the image size: 32px keeps the 20-arch sweep fast (2x2 grid at patch 16).
    img = 32 if request.param != "cifar" else None
    torch.manual_seed(0)
    net = ViTSupernet(space, img_size=img, num_classes=10).eval()
    randomize_(net)
    return net


def test_extracted_subnets_equal_supernet(supernet):
    space = supernet.space
    rng = np.random.default_rng(0)
    x = torch.randn(2, 3, *supernet.img_size)
    archs = [space.sample(rng) for _ in range(18)] + [space.smallest(), space.largest()]
    for arch in archs:
        with torch.no_grad(), supernet.active(arch):
            want = supernet(x)
        sub = supernet.extract(arch)
        assert isinstance(sub, VisionTransformer) and not sub.training
        with torch.no_grad():
            got = sub(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # A fresh model of the same config loads the weights with strict keys.
        with torch.device("meta"):
            fresh = VisionTransformer(**sub.config)
        fresh.load_state_dict(sub.state_dict(), strict=True, assign=True)
        assert supernet.num_params(arch) == sum(p.numel() for p in sub.parameters())
    assert supernet.arch == space.largest()  # `active` restored the default


def test_extraction_is_exact_at_full_resolution():
    space = SearchSpace.preset("autoformer-tiny")
    net = ViTSupernet(space, num_classes=5).eval()
    randomize_(net)
    arch = space.sample(np.random.default_rng(3))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), net.active(arch):
        want = net(x)
        got = net.extract(arch)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", AUTOFORMER)
def test_published_subnet_sizes(name):
    net = ViTSupernet(SearchSpace.preset(name), img_size=32)  # costs are analytic: any build size works
    arch = PUBLISHED[name]
    net.costs = type(net.costs)(**{**net.costs.__dict__, "img_size": 224})
    params = net.num_params(arch)
    expected = {"autoformer-tiny": 5_867_944, "autoformer-small": 22.89e6, "autoformer-base": 53.69e6}[name]
    assert params == pytest.approx(expected, abs=0.005e6)
    published_gmacs = {"autoformer-tiny": 1.3, "autoformer-small": 5.1, "autoformer-base": 11.0}[name]
    assert net.num_macs(arch) / 1e9 == pytest.approx(published_gmacs, rel=0.06)


def test_tiny_published_subnet_counts_exactly_at_224():
    model = VisionTransformer.from_arch(PUBLISHED["autoformer-tiny"], num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 5_867_944


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    # math attention: the fused CPU kernel is invisible to the flop counter
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize(
    "name,img", [("autoformer-tiny", 224), ("autoformer-small", 64), ("autoformer-base", 48), ("cifar", 32)]
)
def test_macs_agree_with_flop_counter(name, img):
    space = SearchSpace.preset(name)
    rng = np.random.default_rng(1)
    for rel_pos in (True, False):
        net = ViTSupernet(space, img_size=img, num_classes=100, rel_pos=rel_pos).eval()
        for arch in (space.sample(rng), space.smallest()):
            counted = count_macs(net.extract(arch), torch.randn(1, 3, img, img))
            assert net.num_macs(arch) == pytest.approx(counted, rel=0.02)
    assert net.num_macs(space.largest()) > net.num_macs(space.smallest())


def test_every_parameter_gets_a_gradient_at_the_largest_arch():
    for name, img in (("cifar", 32), ("autoformer-tiny", 64)):
        space = SearchSpace.preset(name)
        net = ViTSupernet(space, img_size=img, num_classes=10, rel_pos_max=3 if img == 64 else None).train()
        net.set_active(space.largest())
        x = torch.randn(4, 3, img, img)
        F.cross_entropy(net(x), torch.tensor([0, 1, 2, 3])).backward()
        for pname, p in net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
            if space.largest().embed_dim == space.max_embed_dim and not pname.endswith("qkv.bias"):
                # capacity == largest choice: every single weight is trained (the key bias is the
                # exception: a constant added to all keys cancels in the softmax, so its gradient is 0)
                assert (p.grad != 0).float().mean() > 0.99, pname


def test_seeded_training_steps_are_deterministic():
    space = SearchSpace.preset("cifar")

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = ViTSupernet(space, num_classes=10, drop_path_rate=0.1).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        rng = np.random.default_rng(5)
        gen = torch.Generator().manual_seed(1)
        archs = []
        for _ in range(3):
            arch = space.sample(rng)
            archs.append(arch)
            net.set_active(arch)
            x = torch.randn(4, 3, 32, 32, generator=gen)
            loss = F.cross_entropy(net(x), torch.tensor([0, 1, 2, 3]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return archs, [p.detach().clone() for p in net.parameters()]

    archs1, params1 = run()
    archs2, params2 = run()
    assert archs1 == archs2
    for a, b in zip(params1, params2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_active_context_restores_and_rejects_bad_archs():
    space = SearchSpace.preset("cifar")
    net = ViTSupernet(space, num_classes=10)
    small = space.smallest()
    with pytest.raises(RuntimeError), net.active(small):
        assert net.arch == small
        raise RuntimeError("boom")
    assert net.arch == space.largest()
    net.set_active(small)
    with net.active(space.largest()):
        pass
    assert net.arch == small
    too_wide = ArchConfig(192, 4, (2.0,) * 4, (2,) * 4)
    with pytest.raises(ValueError, match="embed_dim=192 exceeds the supernet's max_embed_dim=160"):
        net.set_active(too_wide)
    with pytest.raises(ValueError, match=r"num_heads\[1\]=5 exceeds"):
        net.set_active(ArchConfig(96, 4, (2.0,) * 4, (2, 5, 2, 2)))
    with pytest.raises(ValueError, match="patch grid"):
        net(torch.randn(1, 3, 64, 64))


def test_autoformer_qkv_layout_extracts_exactly():
    space = SearchSpace.preset("cifar")
    net = ViTSupernet(space, num_classes=10, qkv_layout="autoformer").eval()
    randomize_(net)
    x = torch.randn(2, 3, 32, 32)
    arch = ArchConfig(128, 4, (2.0, 3.0, 4.0, 2.0), (2, 3, 4, 2))
    with torch.no_grad(), net.active(arch):
        torch.testing.assert_close(net.extract()(x), net(x), atol=1e-5, rtol=0)
    # The plain bias prefix means k's bias moves with the head count (the reference's quirk).
    w2 = net.blocks[0].attn.active_params(128, 2)["qkv.bias"]
    w4 = net.blocks[0].attn.active_params(128, 4)["qkv.bias"]
    assert torch.equal(w2[64:96], w4[64:96]) and not torch.equal(w2[64:96], w4[128:160])


@pytest.mark.slow
@pytest.mark.parametrize("name", AUTOFORMER)
def test_extraction_at_full_resolution_for_twenty_archs(name):
    space = SearchSpace.preset(name)
    net = ViTSupernet(space, num_classes=1000).eval()
    randomize_(net)
    rng = np.random.default_rng(11)
    x = torch.randn(1, 3, 224, 224)
    for arch in [space.sample(rng) for _ in range(20)]:
        with torch.no_grad(), net.active(arch):
            torch.testing.assert_close(net.extract(arch)(x), net(x), atol=1e-5, rtol=0)


def test_one_vit_config_for_model_supernet_and_costs():
    """`ViTConfig` is the one statement of a ViT's geometry: the static model, the supernet (with the
    space's defaults filled in) and the cost model all read it, and the JSON forms keep their old shapes."""
    from vitnas.costs import ViTCostModel
    from vitnas.models.config import ViTConfig

    space = SearchSpace.preset("cifar")
    net = ViTSupernet(space, num_classes=10, drop_path_rate=0.1, irpe={"on": "k"})
    cfg = net.vit_config
    assert cfg == ViTConfig.from_space(space, num_classes=10, drop_path_rate=0.1, irpe={"on": "k"})
    assert (cfg.img_size, cfg.patch_size, cfg.head_dim, cfg.rel_pos_max) == (
        (space.img_size,) * 2,
        space.patch_size,
        space.head_dim,
        space.rel_pos_max,
    )
    assert net.costs == ViTCostModel.from_config(cfg)
    assert net.init_kwargs["img_size"] is None and net.init_kwargs["rel_pos_max"] is None  # the space's
    again = ViTSupernet(space, **net.init_kwargs)
    assert again.vit_config == cfg and again.init_kwargs == net.init_kwargs
    assert VisionTransformer(**net.model_kwargs).vit_config == cfg.replace(drop_path_rate=(0.0,) * 12)
    arch = space.smallest()
    sub = net.extract(arch)
    direct = VisionTransformer(arch, sub.vit_config)
    assert direct.config == sub.config == VisionTransformer(**sub.config).config
    assert json.loads(json.dumps(sub.config)) == sub.config
    assert sub.config["drop_path_rate"] == net.drop_path_rates[: arch.depth]
    with pytest.raises(TypeError, match="head_dim"):
        ViTSupernet(space, head_dim=32)
    with pytest.raises(ValueError, match="global_pool"):
        ViTConfig(global_pool="max")
