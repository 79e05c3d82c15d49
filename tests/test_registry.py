from __future__ import annotations

import pytest
import torch

import vitnas

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
    torch.manual_seed(0)
    model = vitnas.create_model(name, num_classes=7, img_size=32)  # a 2x2 grid keeps it cheap
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape[0] == 2
    y.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_registry_errors_and_listing():
    assert "deit_small_patch16_224_ctx_cross_56_shared_k" in vitnas.list_models("deit_small*")
    with pytest.raises(ValueError, match="unknown model 'deit_huge'"):
        vitnas.create_model("deit_huge")
