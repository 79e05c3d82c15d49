"""S3 / AutoFormerV2 (NeurIPS'21): the hierarchical search space, its weight-entangled supernet, and the
released S3-T/S/B as subnets of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitnas
from vitnas.models.s3 import S3Transformer, relative_position_index, s3_macs, s3_params
from vitnas.models.spec import build, spec_of
from vitnas.space import load_space, space_from_dict
from vitnas.space.s3 import BLOCK_DIMS, S3Arch, S3Space
from vitnas.supernet import build_supernet
from vitnas.supernet.s3 import S3Supernet, crop_position_table

# Parameters and MACs of the released models at 224 px and 1000 classes (tests/test_s3.py: the reference's).
RELEASED = {
    "s3_tiny": (28_328_674, 4_623_332_352),
    "s3_small": (49_737_298, 9_404_703_744),
    "s3_base": (71_125_762, 13_655_012_352),
}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _counted_macs(config: dict) -> int:
    """FlopCounterMode MACs of one image through `S3Transformer(**config)`, on the meta device."""
    with torch.device("meta"):
        model = S3Transformer(**config).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, config["in_chans"], config["img_size"], config["img_size"]))
    return counter.get_total_flops() // 2


def _released_arch(name: str) -> S3Arch:
    with torch.device("meta"):
        return S3Arch.from_static_config(vitnas.create_model(name).config)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial LayerNorm affines and biases, so equalities test them too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These nets run tiny ops, where a second thread only adds waits (long ones on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar_net():
    torch.manual_seed(0)
    net = S3Supernet(S3Space.preset("s3-cifar"), 10)
    _randomize(net)
    return net.eval()


# -- the supernet ----------------------------------------------------------------------------------
def test_extraction_is_exact_and_costs_are_counted(cifar_net):
    net, space = cifar_net, cifar_net.space
    rng = np.random.default_rng(0)
    x = torch.randn(2, 3, 32, 32)
    for arch in [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(10)]:
        sub = net.extract(arch)
        assert type(sub) is S3Transformer and not sub.training
        with torch.no_grad(), net.active(arch):
            torch.testing.assert_close(sub(x), net(x), atol=1e-5, rtol=1e-5)
        assert net.num_params(arch) == _n_params(sub) == s3_params(sub.config)
        assert net.num_macs(arch) == _counted_macs(sub.config)
    assert net.arch == space.largest()  # active() restored it


def test_training_mode_subnet_matches_its_extraction_with_drop_path():
    """The extracted model runs with the drop-path rates its blocks trained with in the supernet."""
    space = S3Space.preset("s3-cifar")
    net = S3Supernet(space, 10, drop_path_rate=0.3).train()
    arch = space.sample(np.random.default_rng(4))
    sub = net.extract(arch)
    assert sub.training and sub.config["drop_path_rate"] == [
        net.drop_path_rates[sum(space.max_depths[:s]) + j] for s, d in enumerate(arch.depths) for j in range(d)
    ]
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(7)
    with net.active(arch):
        a = net(x)
    torch.manual_seed(7)
    torch.testing.assert_close(sub(x), a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_models_are_subnets_of_the_s3_space(name):
    """At 224 px on the meta device: S3-T/S/B extracted from the `s3-space` supernet are the registered
    models (keys, shapes, config), with their parameter and MAC counts."""
    arch = _released_arch(name)
    space = S3Space.preset("s3-space")
    assert arch in space and (arch in S3Space.preset("s3-tiny-space")) == (name == "s3_tiny")
    with torch.device("meta"):
        net = S3Supernet(space)
        ref = vitnas.create_model(name)
    sub = net.extract(arch)
    assert _shapes(sub) == _shapes(ref)
    assert {k: v for k, v in sub.config.items() if k != "drop_path_rate"} == {
        k: v for k, v in ref.config.items() if k != "drop_path_rate"
    }
    params, macs = RELEASED[name]
    assert net.num_params(arch) == _n_params(sub) == params
    assert net.num_macs(arch) == macs == s3_macs(ref.config)


def test_released_models_run_exactly_at_64px():
    """The three released archs in a real `s3-space` supernet at 64 px: the extraction computes what the
    supernet does and loads strictly into the registered model at that size."""
    torch.manual_seed(1)
    net = S3Supernet(S3Space.preset("s3-space"), 10, img_size=64).eval()
    _randomize(net)
    x = torch.randn(1, 3, 64, 64)
    for name in sorted(RELEASED):
        arch = _released_arch(name)
        sub = net.extract(arch)
        with torch.device("meta"):
            ref = vitnas.create_model(name, img_size=64, num_classes=10)
        ref.load_state_dict(sub.state_dict(), strict=True, assign=True)
        with torch.no_grad(), net.active(arch):
            torch.testing.assert_close(sub(x), net(x), atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_active_slices(cifar_net):
    net = S3Supernet(cifar_net.space, 10)
    net.load_state_dict(cifar_net.state_dict())
    arch = S3Arch(
        (1, 1, 2, 1),
        (16, 32, 64, 128),
        ((2,), (3,), (3, 2), (3,)),
        ((1,), (2,), (4, 6), (8,)),
        ((4,), (8,), (2, 4), (2,)),
    )
    assert arch in net.space and arch.embed_dims[3] < max(net.space.embed_dims[3])
    # what the extracted weights are made of: entries whose gradient a sum over them makes nonzero
    sum(v.sum() for v in net.active_state_dict(arch).values() if v.is_floating_point()).backward()
    used = {n: p.grad != 0 for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    with net.active(arch):
        torch.nn.functional.cross_entropy(net(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    for name, p in net.named_parameters():
        if name not in used:
            assert p.grad is None or not p.grad.any(), name
        else:
            assert not p.grad[~used[name]].any(), name
    assert "layers.0.blocks.1.norm1.weight" not in used  # a block past the depth
    # stage 2 (4x4 map, tables of window 4): block 0 has window 2 (the centre 3x3 offsets) and 4 of 6 heads,
    # block 1 the whole table
    assert used["layers.2.blocks.0.attn.relative_position_bias_table"].sum() == 9 * 4
    assert used["layers.2.blocks.1.attn.relative_position_bias_table"].all()


def test_a_smaller_window_keeps_each_offsets_bias():
    """The centre-crop rule: the bias of relative offset (dy, dx) is the same row for every window."""
    W, w = 5, 3
    index = relative_position_index(W)  # offsets (dy + W - 1) * (2W - 1) + (dx + W - 1)
    table = torch.arange((2 * W - 1) ** 2, dtype=torch.float32)[:, None]
    crop = crop_position_table(table, w, W)
    dy, dx = torch.meshgrid(torch.arange(-(w - 1), w), torch.arange(-(w - 1), w), indexing="ij")
    torch.testing.assert_close(crop[:, 0], ((dy + W - 1) * (2 * W - 1) + (dx + W - 1)).flatten().float())
    assert crop_position_table(table, W, W) is table and index.max() == (2 * W - 1) ** 2 - 1


def test_protocol_errors_and_specs(cifar_net, tmp_path):
    net = cifar_net
    with pytest.raises(TypeError, match="expected an S3Arch"):
        net.set_active(vitnas.ArchConfig(192, 12, (4.0,) * 12, (3,) * 12))
    too_wide = S3Arch((1, 1, 1, 1), (16, 32, 64, 192), (2,) * 4, (1,) * 4, (2,) * 4)
    with pytest.raises(ValueError, match=r"embed_dims\[3\]=192 is above the supernet's max_embed_dims\[3\]=160"):
        net.set_active(too_wide)
    with net.active(net.space.smallest(), side="right"):  # side accepted, meaningless here
        assert net.arch == net.space.smallest()
    with pytest.raises(ValueError, match="input size"):
        net(torch.randn(1, 3, 64, 64))
    spec = spec_of(net)
    assert spec["kind"] == "s3_supernet"
    rebuilt = build(spec, meta_device=True)
    assert isinstance(rebuilt, S3Supernet) and rebuilt.space == net.space and rebuilt.init_kwargs == net.init_kwargs
    assert _shapes(rebuilt) == _shapes(net) and not any(".attn_mask" in k or "index" in k for k in _shapes(net))
    arch = net.space.sample(np.random.default_rng(3))
    sub = net.extract(arch)
    spec = spec_of(sub)
    assert spec == {"kind": "s3", "config": sub.config}
    qkv_widths = [16 * h != e for e, heads in zip(arch.embed_dims, arch.num_heads) for h in heads]
    assert sub.config["decouple_qkv"] == any(qkv_widths) and sum(qkv_widths) > 0
    again = build(spec, meta_device=True)  # built on the CPU: its window gathers are not in the state dict
    again.load_state_dict(sub.state_dict(), strict=True, assign=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), sub(x))
    built = build_supernet(net.space, img_size=32, num_classes=10, drop_path_rate=0.1)
    assert type(built) is S3Supernet and built.max_depth == len(built.drop_path_rates) == 9


def test_static_model_options_for_subnets():
    """q-k-v widths apart from the embedding dim only when asked (the reference cannot), and one drop-path
    rate per block."""
    kw = dict(img_size=64, embed_dims=(96, 192, 384, 768), num_heads=(4, 6, 12, 20), depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="num_heads 4 \\* head_dim 32"):
        S3Transformer(**kw)
    with torch.device("meta"):
        model = S3Transformer(**kw, decouple_qkv=True, drop_path_rate=[0.0, 0.1, 0.2, 0.3])
    assert model.layers[0].blocks[0].attn.qkv.weight.shape == (3 * 128, 96)
    assert model.layers[3].blocks[0].attn.proj.weight.shape == (768, 640)
    assert [m.blocks[0].drop_path for m in model.layers] == [0.0, 0.1, 0.2, 0.3]
    assert s3_params(model.config) == _n_params(model) and s3_macs(model.config) == _counted_macs(model.config)
    with pytest.raises(ValueError, match="drop_path_rate lists 2 rates for 4 blocks"):
        S3Transformer(**kw, decouple_qkv=True, drop_path_rate=[0.0, 0.1])


# -- the space -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["s3-cifar", "s3-tiny-space", "s3-space"])
def test_sample_mutate_crossover_stay_in_the_space(name):
    space = S3Space.preset(name)
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(40)]
    assert len({a.key() for a in archs}) > 35
    for a, b in zip(archs, archs[1:]):
        assert a in space and space.capacity_violations(a) == []
        assert space.mutate(a, rng, layer_prob=0.5, depth_prob=1.0, embed_prob=1.0, unknown_prob=0.3) in space
        assert space.check_arch(space.crossover(a, b, rng)) in space
    assert space.smallest() in space and space.largest() in space
    mutated = [space.mutate(archs[0], rng, layer_prob=0.0, depth_prob=0.0, embed_prob=0.0) for _ in range(3)]
    assert mutated == [archs[0]] * 3


def test_space_values_and_errors():
    cifar = S3Space.preset("s3-cifar")
    assert cifar.img_size == 32 and cifar.resolutions() == [(16, 16), (8, 8), (4, 4), (2, 2)]
    per_block = [2 * 2 * 2, 2 * 2 * 2, 2 * 2 * 2, 2 * 2 * 1]
    stage = [2 * sum(n**d for d in depths) for n, depths in zip(per_block, cifar.depths)]
    assert cifar.size() == int(np.prod(stage))
    assert set(S3Space.presets()) == {"s3-cifar", "s3-space", "s3-tiny-space"}
    assert S3Space().with_(name="s3-space") == S3Space.preset("s3-space")
    assert S3Space(max_embed_dims=(96, 192, 384, 800)).max_embed_dims[3] == 800
    for bad, match in [
        (dict(embed_dims=((96,), (192,))), "depths has 4 stages, embed_dims has 2"),
        (dict(num_heads=((3,), (6,), (0,), (24,))), r"num_heads\[2\] choices must be an integer >= 1, got 0"),
        (dict(window_sizes=((7, 7), 7, 7, 7)), r"window_sizes\[0\] contains duplicates"),
        (dict(max_depths=(2, 2, 10, 2)), r"max_depths\[2\]=10 is smaller than the largest depths\[2\] choice 30"),
        (dict(mlp_ratios=(4, 4, 4, "x")), r"mlp_ratios\[3\] must be a list"),
        (dict(patch_size=300), "patch_size 300 is larger than img_size 224"),
    ]:
        with pytest.raises(ValueError, match=match):
            S3Space(**bad)
    arch = _released_arch("s3_small")
    with pytest.raises(
        ValueError, match=r"x.yaml: arch outside search space 's3-tiny-space': depths\[2\]=18 .*\(and 2 more\)"
    ):
        S3Space.preset("s3-tiny-space").check_arch(arch, source="x.yaml")
    with pytest.raises(ValueError, match=r"window_sizes\[3\]\[1\]=14 is not one of the allowed choices \[7\]"):
        S3Space.preset("s3-tiny-space").check_arch(
            S3Arch((2, 2, 6, 2), (96, 192, 384, 768), (4,) * 4, (3, 6, 12, 24), (7, 7, 14, (7, 14)))
        )


def test_arch_values_and_errors():
    arch = S3Arch((1, 2), (32, 64), (4, 3.5), ((1,), (2, 3)), (7, (7, 14)))
    assert arch.mlp_ratios == ((4,), (3.5, 3.5)) and arch.window_sizes == ((7,), (7, 14)) and arch.depth == 3
    assert arch.key() == str(arch) == "32[4,1,7]/64[3.5,2,7;3.5,3,14]"
    assert S3Arch((1, 2), (32, 64), (4.0, 3.5), ((1,), (2, 3)), (7, (7, 14))) == arch  # 4.0 == 4, one key
    for bad, match in [
        (dict(depths=(1, 0)), r"depths\[1\] must be an integer >= 1, got 0"),
        (dict(embed_dims=(32,)), "embed_dims has 1 stages, depths has 2"),
        (dict(num_heads=((1,), (2, 3, 4))), r"num_heads\[1\] has 3 values for a stage of depth 2"),
        (dict(window_sizes=(7, (7, 2.5))), r"window_sizes\[1\]\[1\] must be an integer >= 1, got 2.5"),
        (dict(mlp_ratios=(4, (3, -1))), r"mlp_ratios\[1\]\[1\] must be a positive number, got -1"),
    ]:
        fields = dict(depths=(1, 2), embed_dims=(32, 64), mlp_ratios=4, num_heads=(1, 2), window_sizes=7) | bad
        if "mlp_ratios" not in bad:
            fields["mlp_ratios"] = (4, 4)
        with pytest.raises(ValueError, match=match):
            S3Arch(**fields)


def test_yaml_round_trips_and_errors_name_the_key(tmp_path):
    space = S3Space.preset("s3-cifar")
    path = tmp_path / "space.yaml"
    space.to_yaml(path)
    assert S3Space.from_yaml(path) == space == S3Space(**space.to_dict())
    assert load_space(str(path)) == space and load_space("s3-cifar") == space
    assert space_from_dict(space.to_dict()) == space
    arch = space.sample(np.random.default_rng(0))
    arch.to_yaml(tmp_path / "arch.yaml")
    assert S3Arch.from_yaml(tmp_path / "arch.yaml") == arch == S3Arch.from_json(arch.to_json())
    assert space.arch_from_dict(arch.to_dict()) == arch and arch.kind == "s3"
    assert vitnas.space.arch_from_yaml(space, tmp_path / "arch.yaml") == arch
    (tmp_path / "wrapped.yaml").write_text(f"arch:\n  {arch.to_yaml().replace(chr(10), chr(10) + '  ')}")
    assert S3Arch.from_yaml(tmp_path / "wrapped.yaml") == arch

    (tmp_path / "bad_key.yaml").write_text(arch.to_yaml() + "width: 3\n")
    with pytest.raises(ValueError, match=r"bad_key.yaml: unknown key 'width'"):
        S3Arch.from_yaml(tmp_path / "bad_key.yaml")
    (tmp_path / "missing.yaml").write_text("depths: [1, 1, 1, 1]\n")
    with pytest.raises(ValueError, match=r"missing.yaml: missing key 'embed_dims'"):
        S3Arch.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad_value.yaml").write_text(arch.to_yaml().replace("depths: [", "depths: [-1, "))
    with pytest.raises(ValueError, match=r"bad_value.yaml: depths\[0\] must be an integer >= 1, got -1"):
        S3Arch.from_yaml(tmp_path / "bad_value.yaml")
    (tmp_path / "bad_space.yaml").write_text("space:\n  window_sizes: [7, 7, 7, 7]\n  depth: [1, 2]\n")
    with pytest.raises(ValueError, match=r"bad_space.yaml: unknown key 'depth'"):
        load_space(str(tmp_path / "bad_space.yaml"))
    (tmp_path / "outside.yaml").write_text(space.largest().to_yaml().replace("embed_dims: [24", "embed_dims: [20"))
    with pytest.raises(ValueError, match=r"outside.yaml: arch outside search space 's3-cifar': embed_dims\[0\]=20"):
        vitnas.space.arch_from_yaml(space, tmp_path / "outside.yaml")


# -- encodings and search --------------------------------------------------------------------------
def _genome(space: S3Space, arch: S3Arch) -> list[int]:
    """The genes `from_genome` reads, written out independently: choice indices, unused slots 0."""
    S = space.num_stages
    genes = [space.depths[i].index(arch.depths[i]) for i in range(S)]
    genes += [space.embed_dims[i].index(arch.embed_dims[i]) for i in range(S)]
    for i in range(S):
        for j in range(max(space.depths[i])):
            for dim in BLOCK_DIMS:
                genes.append(getattr(space, dim)[i].index(getattr(arch, dim)[i][j]) if j < arch.depths[i] else 0)
    return genes


@pytest.mark.parametrize("name", ["s3-cifar", "s3-space"])
def test_genome_and_features(name):
    space = S3Space.preset(name)
    rng = np.random.default_rng(1)
    archs = [space.sample(rng) for _ in range(20)] + [space.smallest(), space.largest()]
    upper = space.genome_upper()
    for arch in archs:
        genes = _genome(space, arch)
        assert len(genes) == len(upper) and all(0 <= g <= u for g, u in zip(genes, upper))
        assert space.from_genome(np.asarray(genes, dtype=float) + 0.2) == arch
    with pytest.raises(ValueError, match="genes"):
        space.from_genome([0, 1])
    feats = space.features(archs)
    assert feats.shape == (len(archs), len(space.features([archs[0]])[0])) and feats.min() >= 0 and feats.max() <= 1
    assert np.allclose(feats[-1][: 2 * space.num_stages], 1.0) and len({tuple(f) for f in feats}) == len(archs)


@pytest.mark.parametrize("name", ["evolution", "random", "nsga2", "predictor-evolution"])
def test_every_strategy_searches_and_resumes_on_the_s3_space(tmp_path, name):
    """Strategies know the space only through its protocol (sample / mutate / crossover / genome / features)."""
    from _search_protocol import check_search_and_resume

    space = S3Space.preset("s3-cifar")
    with torch.device("meta"):
        net = build_supernet(space, img_size=32, num_classes=10)

    def accuracy(arch):  # wider and deeper scores higher, penalised by MACs
        return {"top1": 40 + sum(arch.embed_dims) / 10 + arch.depth - net.num_macs(arch) / 1e6, "loss": 1.0}

    check_search_and_resume(tmp_path, name, space, net, accuracy, max_macs=9.0e6, crash_at=15)  # ~3 in 4 archs fit
