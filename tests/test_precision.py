"""Reduced-precision choice: CPU capability detection, what each amp mode resolves to, and bf16 scoring."""

from __future__ import annotations

import pytest
import torch

from vitnas import SearchSpace, ViTSupernet
from vitnas.data import AugmentConfig
from vitnas.data.datasets import Split
from vitnas.precision import amp_dtype, cpu_bf16_capability
from vitnas.search.evaluator import SupernetEvaluator

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SPR = "flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
OLD = "flags\t\t: fpu sse2 avx2 fma\n"


def test_cpu_capability_is_read_from_the_flags():
    assert cpu_bf16_capability(SPR) == "AMX-BF16"
    assert cpu_bf16_capability(ZEN4) == "AVX512-BF16"
    assert cpu_bf16_capability(OLD) is None
    assert cpu_bf16_capability("") is None


def test_amp_modes(monkeypatch):
    assert amp_dtype("off", "cpu") is None
    assert amp_dtype("bf16", "cpu") is torch.bfloat16
    assert amp_dtype("fp16", "cpu") is torch.float16
    monkeypatch.setattr("vitnas.precision.cpu_bf16_capability", lambda: "AVX512-BF16")
    assert amp_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr("vitnas.precision.cpu_bf16_capability", lambda: None)
    assert amp_dtype("auto", "cpu") is None
    with pytest.raises(ValueError, match="amp='half'"):
        amp_dtype("half", "cpu")


def test_bf16_scoring_is_close_to_fp32():
    space = SearchSpace.preset("digits")
    torch.manual_seed(0)
    net = ViTSupernet(space, num_classes=10)
    split = Split(torch.arange(64) % 10, images=torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8))
    kw = dict(img_size=16, norm=AugmentConfig(), batch_size=32)
    fp32 = SupernetEvaluator(net, split, **kw)
    bf16 = SupernetEvaluator(net, split, amp_dtype=torch.bfloat16, **kw)
    for arch in (space.smallest(), space.largest()):
        a, b = fp32(arch), bf16(arch)
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
        assert abs(b["top1"] - a["top1"]) <= 100 * 3 / 64  # a few images may flip on near-ties
