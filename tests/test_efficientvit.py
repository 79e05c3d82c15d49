from __future__ import annotations

import copy

import pytest
import torch

import vitnas
from vitnas.costs.macs import count_macs

# Parameter counts of the reference implementation (224px, 1000 classes; published 2.3/3.0/4.2/6.9/8.8/12.4M)
# and its published FLOPs (multiply-accumulates, millions).
REFERENCE = {
    0: (2_349_436, 79),
    1: (2_980_560, 167),
    2: (4_187_554, 201),
    3: (6_900_722, 263),
    4: (8_804_228, 299),
    5: (12_473_772, 522),
}


@pytest.mark.parametrize("variant", sorted(REFERENCE))
def test_parameters_and_macs(variant):
    params, macs = REFERENCE[variant]
    with torch.device("meta"):
        model = vitnas.create_model(f"efficientvit_m{variant}")
    assert sum(p.numel() for p in model.parameters()) == params
    assert count_macs(f"efficientvit_m{variant}") / 1e6 == pytest.approx(macs, rel=0.03)


def test_fuse_folds_every_batchnorm_and_keeps_outputs():
    torch.manual_seed(0)
    model = vitnas.create_model("efficientvit_m0", num_classes=10, img_size=64).train()
    for _ in range(3):  # non-trivial running statistics and BN weights
        model(torch.randn(8, 3, 64, 64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".bn." in name or name.endswith("attention_biases"):
                p.normal_(0, 0.3)
    model.eval()
    fused = copy.deepcopy(model).fuse()
    assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in fused.modules())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-4)


def test_windows_with_padding():
    """A 15x15 stage-1 map is padded to 21x21 (three 7x7 windows a side), then cropped back."""
    model = vitnas.create_model("efficientvit_m0", num_classes=5, img_size=240).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 240, 240)).shape == (1, 5)
