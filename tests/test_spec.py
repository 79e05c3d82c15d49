"""One model spec: checkpoints and exported folders written by the code before it (c2a5bfa, files in
tests/fixtures/c2a5bfa) still load, with the same logits; spec_of / build round-trip every kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vitnas
from vitnas.export import export_subnet, load_subnet
from vitnas.models.spec import build, export_spec, load_model, spec_of
from vitnas.supernet import ViTSupernet

OLD = Path(__file__).parent / "fixtures" / "c2a5bfa"
LOGITS = json.loads((OLD / "logits.json").read_text())
X = torch.tensor(LOGITS["x"])
X_REGISTRY = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_old_checkpoints_load_with_their_logits():
    supernet, meta = load_model(OLD / "supernet.safetensors")
    assert isinstance(supernet, ViTSupernet) and meta["model"]["kind"] == "supernet"
    arch = supernet.space.smallest()
    with torch.no_grad():
        torch.testing.assert_close(supernet.extract(arch).eval()(X), torch.tensor(LOGITS["supernet_smallest"]))
        vit, meta = load_model(OLD / "vit.safetensors")
        assert vit.arch == arch and meta["arch"] == arch.to_dict()
        torch.testing.assert_close(vit(X), torch.tensor(LOGITS["vit"]))
        reg, meta = load_model(OLD / "registry.safetensors")
        assert meta["model"]["name"] == "efficientvit_m0"
        torch.testing.assert_close(reg(X_REGISTRY), torch.tensor(LOGITS["registry"]))


def test_old_trained_checkpoint_loads_and_resumes_its_optimizer():
    from vitnas.checkpoint import optimizer_state, read_checkpoint

    model, meta = load_model(OLD / "supernet_trained.safetensors")
    assert meta["step"] == 2 and meta["config"]["task"] == "supernet"
    groups, meta = read_checkpoint(OLD / "supernet_trained.safetensors")
    from types import SimpleNamespace

    from vitnas.train.tasks import Task

    opt = torch.optim.AdamW(Task(SimpleNamespace(weight_decay=0.05)).param_groups(model))
    opt.load_state_dict(optimizer_state(groups, meta))  # the old layout of optimizer tensors still reads
    assert all(int(s["step"]) == 2 for s in opt.state.values())


def test_old_exported_folders_load_with_their_logits():
    with torch.no_grad():
        vit = load_subnet(OLD / "export_vit")
        torch.testing.assert_close(vit(X), torch.tensor(LOGITS["vit"]))
        reg = load_subnet(OLD / "export_registry")
        torch.testing.assert_close(reg(X_REGISTRY), torch.tensor(LOGITS["registry"]))


@pytest.mark.parametrize("kind", ["supernet", "vit", "registry"])
def test_spec_round_trip_and_new_export(tmp_path, kind):
    supernet, _ = load_model(OLD / "supernet.safetensors")
    model = {
        "supernet": supernet,
        "vit": supernet.extract(supernet.space.largest()).eval(),
        "registry": vitnas.create_model("efficientvit_m0", num_classes=3, img_size=32, depth=[1, 1, 1]).eval(),
    }[kind]
    spec = spec_of(model)
    assert spec["kind"] == kind and json.loads(json.dumps(spec)) == spec
    rebuilt = build(spec)
    assert type(rebuilt) is type(model) and spec_of(rebuilt) == spec
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    if kind == "supernet":
        with pytest.raises(TypeError, match="cannot export a supernet"):
            export_subnet(model, tmp_path)
        return
    export_subnet(model, tmp_path)
    assert export_spec(json.loads((tmp_path / "config.json").read_text())) == spec
    x = X_REGISTRY if kind == "registry" else X
    with torch.no_grad():
        torch.testing.assert_close(load_subnet(tmp_path)(x), model(x), atol=0, rtol=0)


def test_bad_specs_name_the_problem():
    with pytest.raises(ValueError, match="unknown model kind 'mbconv'"):
        build({"kind": "mbconv"})
    with pytest.raises(ValueError, match="expected a mapping with key 'kind'"):
        build({"name": "x"})
    with pytest.raises(ValueError, match="expected key 'spec'"):
        export_spec({"model": "ResNet"})
    with pytest.raises(TypeError, match="cannot describe a Linear"):
        spec_of(torch.nn.Linear(2, 2))


def test_supernet_kinds_are_the_kinds_that_extract_subnets():
    """Export, evaluate, teachers and init_from ask `is_supernet`: it must name every supernet kind."""
    from vitnas.models.spec import KINDS, is_supernet

    for kind, entry in KINDS.items():
        assert is_supernet(kind) == hasattr(entry.cls, "extract"), kind
