from __future__ import annotations

import pytest
import torch

import vitnas
from vitnas.costs.macs import count_macs

# Parameters and MACs of the reference implementation at 1000 classes (published: 5.4M/1.3G, 11M/2.0G, 21M/4.3G).
REFERENCE = {
    "tiny_vit_5m_224": (5_392_764, 1_255_174_720),
    "tiny_vit_11m_224": (10_996_972, 2_016_046_144),
    "tiny_vit_21m_224": (21_198_568, 4_250_329_536),
    "tiny_vit_21m_384": (21_230_488, None),
    "tiny_vit_21m_512": (21_268_120, None),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameters_and_macs(name):
    params, macs = REFERENCE[name]
    with torch.device("meta"):
        meta_model = vitnas.create_model(name)
    assert sum(p.numel() for p in meta_model.parameters()) == params
    if macs is not None:
        assert count_macs(name) == pytest.approx(macs, rel=1e-6)


def test_windows_pad_non_multiple_grids():
    """224 + 32 px: stage maps of 64/32/16/8 against windows 7/7/14/7 need padding, then cropping."""
    model = vitnas.create_model("tiny_vit_5m_224", num_classes=3, img_size=256).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 3)


def test_fuse_and_in_place_inference_give_the_same_outputs():
    """fuse() folds the BNs; without autograd, GELUs and residual adds write in place. Neither may change
    the outputs (BN statistics randomized so the folding matters)."""
    import copy

    torch.manual_seed(0)
    model = vitnas.create_model("tiny_vit_5m_224", num_classes=10, img_size=64).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.normal_(1, 0.1)
            m.bias.data.normal_(0, 0.1)
    x = torch.randn(2, 3, 64, 64)
    want = model(x)  # autograd on: the out-of-place path
    assert want.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        fused = copy.deepcopy(model).fuse()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        torch.testing.assert_close(fused(x), want, atol=1e-4, rtol=1e-4)
