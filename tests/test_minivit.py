from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitnas
from vitnas.costs.macs import count_macs
from vitnas.models.minivit import MiniDeiT, mix_heads
from vitnas.nn.functional import attention

# The reference (MiniViT/Mini-DeiT, run with random weights): parameters and MACs at 1000 classes, its
# own resolution. Published: 3M / 11M / 44M / 44M parameters; FLOPs 1.3G / 4.7G / 17.7G (MiniViT paper,
# table of DeiT results, 224px; quoted from the paper, not in the reference repository).
REFERENCE = {
    "mini_deit_tiny_patch16_224": (3_090_304, 1_276_989_312, 3e6, 1.3e9),
    "mini_deit_small_patch16_224": (11_450_824, 4_651_473_408, 11e6, 4.7e9),
    "mini_deit_base_patch16_224": (44_098_408, 17_692_925_952, 44e6, 17.7e9),
    "mini_deit_base_patch16_384": (44_390_248, 56_784_893_952, 44e6, None),
}
# The reference's parameters with each pair's qkv/proj/fc1/fc2 counted twice (an unshared 12-layer model).
UNSHARED = {"mini_deit_tiny_patch16_224": 5_754_880, "mini_deit_small_patch16_224": 22_088_392}

# The reference's state dict, as key patterns: {i} = pair 0..5, {r} = repetition 0..1; C embed dim,
# H heads, N patches, K classes. iRPE tables: one shared head, head_dim 64, 49 buckets.
REFERENCE_KEYS = {
    "pos_embed": (1, "N", "C"),
    "patch_embed.proj.weight": ("C", 3, 16, 16),
    "patch_embed.proj.bias": ("C",),
    "blocks.{i}.block.norm1.instances.{r}.weight": ("C",),
    "blocks.{i}.block.norm1.instances.{r}.bias": ("C",),
    "blocks.{i}.block.norm2.instances.{r}.weight": ("C",),
    "blocks.{i}.block.norm2.instances.{r}.bias": ("C",),
    "blocks.{i}.block.attn.qkv.weight": ("3C", "C"),
    "blocks.{i}.block.attn.qkv.bias": ("3C",),
    "blocks.{i}.block.attn.proj.weight": ("C", "C"),
    "blocks.{i}.block.attn.proj.bias": ("C",),
    "blocks.{i}.block.attn.rpe_k.instances.{r}.lookup_table_weight": (1, 64, 49),
    "blocks.{i}.block.attn.conv_l.instances.{r}.weight": ("H", "H", 1, 1),
    "blocks.{i}.block.attn.conv_w.instances.{r}.weight": ("H", "H", 1, 1),
    "blocks.{i}.block.mlp.fc1.weight": ("4C", "C"),
    "blocks.{i}.block.mlp.fc1.bias": ("4C",),
    "blocks.{i}.block.mlp.fc2.weight": ("C", "4C"),
    "blocks.{i}.block.mlp.fc2.bias": ("C",),
    "norm.weight": ("C",),
    "norm.bias": ("C",),
    "head.weight": ("K", "C"),
    "head.bias": ("K",),
}


def reference_shapes(C: int, H: int, N: int, K: int) -> dict[str, tuple[int, ...]]:
    dims = {"C": C, "3C": 3 * C, "4C": 4 * C, "H": H, "N": N, "K": K}
    out = {}
    for pattern, shape in REFERENCE_KEYS.items():
        for i in range(6) if "{i}" in pattern else [0]:
            for r in range(2) if "{r}" in pattern else [0]:
                out[pattern.format(i=i, r=r)] = tuple(dims[d] if isinstance(d, str) else d for d in shape)
    return out


def meta_model(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return vitnas.create_model(name, **kw).eval()


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameters_and_macs_equal_the_reference(name):
    params, macs, published_params, published_flops = REFERENCE[name]
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert round(params / 1e6) == published_params / 1e6
    assert count_macs(name) == macs
    if published_flops is not None:
        assert macs == pytest.approx(published_flops, rel=0.03)


@pytest.mark.parametrize("name", sorted(UNSHARED))
def test_weights_are_shared_within_each_pair(name):
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) < UNSHARED[name]
    # which Parameter objects each of the 12 layer applications actually runs with
    used: list[tuple[int, ...]] = []
    norms: list[int] = []

    def record(module, args, kwargs):
        r = args[1]
        a, m = module.attn, module.mlp
        used.append(tuple(id(p) for p in (a.qkv.weight, a.proj.weight, m.fc1.weight, m.fc2.weight)))
        norms.append(id(module.norm1[r].weight))

    for group in model.blocks:
        group.block.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad(), torch.device("meta"):
        model(torch.zeros(1, 3, 224, 224))
    assert len(used) == 12
    assert all(used[2 * g] == used[2 * g + 1] for g in range(6))  # one set of weights per pair
    assert len(set(used)) == 6  # and a different set per pair
    assert len(set(norms)) == 12  # LayerNorms are per repetition
    # the shared weights are stored once: 6 qkv weights in the whole model
    assert sum(1 for n, _ in model.named_parameters() if n.endswith("attn.qkv.weight")) == 6


def test_reference_state_dict_loads_with_strict_keys():
    torch.manual_seed(0)
    model = vitnas.create_model("mini_deit_tiny_patch16_224", num_classes=10)
    expected = reference_shapes(C=192, H=3, N=196, K=10)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    sd = {k: torch.randn(s) for k, s in expected.items()}
    assert not model.load_state_dict(sd, strict=True).missing_keys
    key = "blocks.3.block.attn.conv_w.instances.1.weight"
    assert torch.equal(model.state_dict()[key], sd[key])


def test_mix_heads_is_the_references_1x1_conv():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 4, 1, 1)
    torch.testing.assert_close(mix_heads(x, w), F.conv2d(x, w))


def test_identity_transforms_without_irpe_give_plain_attention():
    """With conv_l = conv_w = I and no iRPE, the multiplexed attention is ordinary attention."""
    torch.manual_seed(0)
    model = MiniDeiT(img_size=32, embed_dim=48, num_heads=3, depth=4, irpe=None).eval()
    attn = model.blocks[0].block.attn
    with torch.no_grad():
        for m in (*attn.conv_l.instances, *attn.conv_w.instances):
            m.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    x = torch.randn(2, 4, 48)
    want = attention(
        x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, num_heads=3, head_dim=16, scale=16**-0.5
    )
    with torch.no_grad():
        torch.testing.assert_close(attn(x, 1), want)


def test_config_rebuilds_and_transforms_start_near_zero():
    model = vitnas.create_model("mini_deit_tiny_patch16_224", img_size=64, num_classes=5)
    again = MiniDeiT(**model.config)
    assert list(again.state_dict()) == list(model.state_dict())
    w = model.blocks[0].block.attn.conv_l[0].weight
    assert w.abs().max() <= 0.04 and w.std() > 0  # trunc_normal(std=0.02), as the reference
    assert not model.blocks[0].block.attn.rpe_k[1].lookup_table_weight.any()  # iRPE tables start at zero
    with pytest.raises(ValueError, match="patch grid"):
        model(torch.zeros(1, 3, 32, 32))
