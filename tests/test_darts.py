"""DARTS cell space, genotype networks, the DARTS supernet and the DARTS / CDARTS search tasks."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitnas.data import load_digits
from vitnas.models import create_model
from vitnas.models.darts import DartsNet, num_params_without_aux
from vitnas.models.spec import build, spec_of
from vitnas.space import load_space, space_from_dict
from vitnas.space.darts import PRIMITIVES, PUBLISHED, DartsSpace, Genotype, derive_genotype, published_genotype
from vitnas.supernet.darts import CDARTSSupernet, DartsSupernet, MixedOp
from vitnas.train import TrainConfig, Trainer
from vitnas.train.tasks.cdarts import cdarts_step_loss

TINY = load_space("darts-tiny")


# -- genotypes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cdarts_cifar", "cdarts_imagenet"])
def test_reference_genotype_strings_round_trip_exactly(name):
    text = PUBLISHED[name]
    g = Genotype.from_str(text)
    assert g.to_str() == text
    assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5)


def test_flat_darts_string_reads_as_nested_cells():
    g = published_genotype("darts_v2")
    assert len(g.normal) == 4 and all(len(node) == 2 for node in g.normal)
    assert g.normal[2] == (("sep_conv_3x3", 1), ("skip_connect", 0))
    assert Genotype.from_str(g.to_str()) == g
    assert Genotype.from_dict(g.to_dict()) == g
    assert Genotype.from_dict({"genotype": g.to_str()}) == g


def test_reference_cells_json_and_yaml(tmp_path):
    path = tmp_path / "cifar_genotype.json"
    path.write_text(json.dumps({str(i): PUBLISHED["cdarts_cifar"] for i in range(3)}))
    g = Genotype.from_reference_json(path)
    assert g == published_genotype("cdarts_cifar")
    g.to_yaml(tmp_path / "arch.yaml")
    assert Genotype.from_yaml(tmp_path / "arch.yaml") == g
    path.write_text(json.dumps({"0": PUBLISHED["cdarts_cifar"], "1": PUBLISHED["cdarts_imagenet"]}))
    with pytest.raises(ValueError, match="stages"):
        Genotype.from_reference_json(path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("Genotype(normal=[[('conv_9x9', 0)]], normal_concat=[2], reduce=[], reduce_concat=[])", "unknown op"),
        ("Genotype(normal=[[('skip_connect', 3)]], normal_concat=[2], reduce=[], reduce_concat=[])", "node 0"),
        ("__import__('os').system('true')", "Genotype"),
        ("Genotype(normal=[], reduce=[])", "needs"),
    ],
)
def test_bad_genotype_strings_are_refused_without_eval(text, match):
    with pytest.raises(ValueError, match=match):
        Genotype.from_str(text)


def test_space_protocol_sample_mutate_crossover_genome():
    space, rng = load_space("darts-cifar"), np.random.default_rng(0)
    assert isinstance(space_from_dict(space.to_dict()), DartsSpace)
    for _ in range(20):
        a, b = space.sample(rng), space.sample(rng)
        assert a in space and space.mutate(a, rng) in space and space.crossover(a, b, rng) in space
        x = [int(rng.integers(0, u + 1)) for u in space.genome_upper()]
        assert space.from_genome(x) in space
    assert published_genotype("cdarts_cifar") in space
    assert space.features([a, b]).shape == (2, 2 * sum(i + 2 for i in range(4)))
    assert space.smallest() in space and space.largest() in space


def test_derive_genotype_keeps_top2_edges_and_ignores_none():
    n_ops = len(PRIMITIVES)
    weights = []
    for i in range(4):
        w = np.full((i + 2, n_ops), 0.01)
        w[:, PRIMITIVES.index("none")] = 0.9  # never chosen
        w[0, PRIMITIVES.index("sep_conv_3x3")] = 0.5
        w[i + 1, PRIMITIVES.index("max_pool_3x3")] = 0.4
        weights.append(w)
    g = derive_genotype(weights, weights)
    for i, node in enumerate(g.normal):
        assert node == (("sep_conv_3x3", 0), ("max_pool_3x3", i + 1))


# -- networks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, params, with_aux",
    [
        ("cdarts_cifar", 3_859_318, 4_335_744),
        ("darts_v2_cifar", 3_349_342, 3_825_768),
        ("cdarts_imagenet", 6_624_688, None),
    ],
)
def test_registered_genotype_networks_have_the_reference_parameter_counts(name, params, with_aux):
    """CDARTS's CIFAR network: 3.86M without / 4.34M with the auxiliary head (computed from the reference code);
    DARTS V2 is the paper's 3.3M."""
    with torch.device("meta"):
        model = create_model(name)
    assert num_params_without_aux(model) == params
    if with_aux:
        assert sum(p.numel() for p in model.parameters()) == with_aux


def test_reference_key_layout_and_aux_logits():
    model = create_model("cdarts_cifar", channels=8, layers=(2, 2, 2)).train()
    keys = set(model.state_dict())
    assert "feature_extractor.0.0.weight" in keys and "fc.weight" in keys and "aux_head.classifier.weight" in keys
    assert "nas_layers.0.0.preproc0.net.1.weight" in keys
    assert "nas_layers.0.0.dag.0.0.0.net.0.net.1.weight" in keys  # sep conv inside (op, drop path)
    assert "nas_layers.1.0.preproc0.conv1.weight" in keys  # after a reduction cell: factorized reduce
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10) and model.aux_logits.shape == (2, 10)
    model.eval()
    model(x)
    assert model.aux_logits is None
    rebuilt = build(spec_of(model))
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(x), model(x))


def test_mixed_op_with_one_hot_weights_equals_the_chosen_op():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8)
    for stride in (1, 2):
        mixed = MixedOp(6, stride, TINY.ops, affine=False).eval()
        for k, name in enumerate(mixed.names):
            w = torch.zeros(len(mixed.names))
            w[k] = 1.0
            assert torch.allclose(mixed(x, w), mixed._ops[k](x), atol=1e-6), (name, stride)
            assert torch.equal(mixed(x, index=k), mixed._ops[k](x))


def test_supernet_path_equals_extracted_network_and_costs_match():
    space = load_space("darts-small")
    torch.manual_seed(0)
    net = DartsSupernet(space, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    rng = np.random.default_rng(1)
    for _ in range(3):
        g = space.sample(rng)
        with net.active(g):
            y = net(x)
        child = net.extract(g).eval()
        assert isinstance(child, DartsNet)
        assert torch.allclose(child(x), y, atol=1e-6)
        assert net.num_params(g) == num_params_without_aux(child)
        assert net.num_macs(g) > 0
    full = DartsSupernet(load_space("darts-cifar"))
    assert full.num_params(published_genotype("cdarts_cifar")) == 3_859_318
    assert 585e6 < full.num_macs(published_genotype("cdarts_cifar")) < 595e6  # reference: about 590M


def test_search_network_derives_a_genotype_in_the_space_and_extracts():
    net = DartsSupernet(TINY, role="search").eval()
    x = torch.randn(2, 3, 16, 16)
    assert net(x).shape == (2, 10)
    g = net.genotype()
    assert g in TINY
    child = net.extract(g).eval()  # BatchNorm without affine becomes weight 1, bias 0
    with net.active(g):
        assert torch.allclose(child(x), net(x), atol=1e-6)


def test_cdarts_pair_distillation_loss_and_gradients():
    torch.manual_seed(0)
    model = CDARTSSupernet(TINY, num_classes=4)
    model.set_active(model.search.genotype())
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    loss, parts = cdarts_step_loss(model, x, y, loss_alpha=1.0, temperature=2.0)
    loss.backward()
    assert parts["kd"] >= 0
    assert model.search.alpha_normal.grad is not None and model.search.alpha_normal.grad.abs().sum() > 0
    assert any(p.grad is not None for p in model.evalnet.parameters())
    assert build(spec_of(model)).num_params(model.arch) == model.num_params()


# -- the search tasks -----------------------------------------------------------------------------------
def _trainer(tmp_path, task: str, **darts) -> Trainer:
    cfg = TrainConfig(
        task=task,
        space="darts-tiny",
        recipe="digits",
        epochs=2,
        batch_size=16,
        val_per_class=5,
        optimizer="sgd",
        lr=0.4,
        weight_decay=3e-4,
        amp="off",
        eval_batch_size=64,
        threads=1,
        darts={"pretrain_epochs": 0, "eval_warmup_epochs": 0, "cycle_epochs": 1, **darts},
        out_dir=str(tmp_path / task),
    )
    data = load_digits(img_size=16, val_per_class=5).with_train_per_class(12)  # 60 + 60 images: 4 steps an epoch
    return Trainer(cfg, data=data)


def _batch(trainer: Trainer):
    from vitnas.train.tasks.base import Batch

    images, labels = trainer.data.train.take(np.arange(16))
    x, targets = trainer.augment(images, labels, None, 0)
    return Batch(x, targets, labels, None, 0, 0)


def test_darts_alpha_learns_only_from_the_held_out_loss(tmp_path):
    """The weights' step sees α detached; α's Adam step equals one on the held-out batch's gradient alone."""
    trainer = _trainer(tmp_path, "darts")
    task, net = trainer.task, trainer.model
    batch = _batch(trainer)
    task._weights_step(batch)
    assert net.alpha_normal.grad is None and net.alpha_reduce.grad is None
    assert any(p.grad is not None for p in net.weight_parameters())
    net.zero_grad(set_to_none=True)

    torch.manual_seed(3)
    held_out = task._arch_batch(batch)
    task._arch_batch = lambda b: held_out  # the same held-out batch for the reference computation
    ref_net = copy.deepcopy(net)
    ref_opt = torch.optim.Adam(ref_net.arch_parameters(), lr=task.darts.alpha_lr, betas=(0.5, 0.999), weight_decay=1e-3)
    F.cross_entropy(ref_net(held_out[0]), held_out[1]).backward()
    torch.nn.utils.clip_grad_norm_(ref_net.arch_parameters(), task.darts.clip)
    ref_opt.step()
    before = [p.detach().clone() for p in net.weight_parameters()]
    alpha_before = net.alpha_normal.detach().clone()
    task.loss(batch)
    assert not torch.equal(net.alpha_normal, alpha_before)
    assert torch.allclose(net.alpha_normal, ref_net.alpha_normal, atol=1e-7)
    assert torch.allclose(net.alpha_reduce, ref_net.alpha_reduce, atol=1e-7)
    # the held-out step changed no weight, and left only the training batch's gradients behind
    assert all(torch.equal(a, b) for a, b in zip(before, net.weight_parameters()))
    assert net.alpha_normal.grad is None


def test_held_out_split_is_disjoint_and_seeded(tmp_path):
    trainer = _trainer(tmp_path, "darts")
    n_train, n_arch = len(trainer.data.train), len(trainer.task.arch_split)
    assert abs(n_train - n_arch) <= 1 and n_train > 0
    again = _trainer(tmp_path / "b", "darts")
    assert torch.equal(trainer.task.arch_split.images, again.task.arch_split.images)


def test_cdarts_phases_and_a_short_run_writes_reports(tmp_path):
    trainer = _trainer(tmp_path, "cdarts", pretrain_epochs=1, eval_warmup_epochs=1, cycle_epochs=1)
    task = trainer.task
    assert [task.phase(e) for e in range(5)] == ["pretrain", "eval_warmup", "search", "eval_warmup", "search"]
    trainer.cfg.max_steps = None
    result = trainer.fit()
    scores = result["history"][-1]
    assert {"val_top1", "val_top1_search"} <= set(scores)
    out = tmp_path / "cdarts"
    assert (out / "alpha.png").is_file() and (out / "cells.png").is_file()
    assert Genotype.from_yaml(out / "genotype.yaml") in TINY
    assert len(task.history) == 2 and task.model.arch in TINY


def test_search_cli_with_gradient_strategy_exports_genotype_and_onnx(tmp_path):
    """`vitnas search --strategy darts`: trains with task darts, scores the derived genotype, exports it
    (arch.yaml, weights, ONNX checked by onnxruntime); `vitnas retrain` then trains that genotype from scratch."""
    import yaml

    from vitnas.cli import main
    from vitnas.export import load_subnet

    cfg = {
        "out_dir": str(tmp_path / "run"),
        "train": {
            "space": "darts-tiny",
            "recipe": "digits",
            "val_per_class": 100,
            "epochs": 1,
            "batch_size": 32,
            "optimizer": "sgd",
            "lr": 0.4,
            "threads": 1,
            "darts": {"pretrain_epochs": 0},
        },
        "search": {"constraints": {}, "cost": "params", "bn_calibration": 64},
        "baseline": False,
        "onnx": True,
    }
    (tmp_path / "darts.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["search", "--config", str(tmp_path / "darts.yaml"), "--strategy", "darts"]) == 0
    export = tmp_path / "run" / "export"
    genotype = Genotype.from_yaml(export / "arch.yaml")
    assert genotype in TINY and (export / "model.onnx").is_file()
    assert isinstance(load_subnet(export), DartsNet)
    args = ["retrain", "--space", "darts-tiny", "--arch", str(export / "arch.yaml"), "--recipe", "digits"]
    args += ["--epochs", "1", "--max-steps", "2", "--val-per-class", "100", "--out-dir", str(tmp_path / "rt")]
    assert main(args) == 0
    from vitnas.models.spec import load_model

    model, _ = load_model(tmp_path / "rt" / "last.safetensors")
    assert isinstance(model, DartsNet) and model.genotype == genotype
    assert model.config["channels"] == TINY.channels  # retrained at the space's width


DDP_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from vitnas.train import Trainer, TrainConfig
out = sys.argv[1]
cfg = TrainConfig(task="cdarts", space="darts-tiny", recipe="digits", batch_size=16, val_per_class=20, epochs=1,
                  optimizer="sgd", lr=0.4, ckpt_every=1000, threads=1, out_dir=out, max_steps=4,
                  darts={"pretrain_epochs": 0, "eval_warmup_epochs": 0, "cycle_epochs": 1})
trainer = Trainer(cfg)
trainer.fit()
params = {k: p.detach().contiguous() for k, p in trainer.model.named_parameters()}
save_file(params, f"{out}/rank{trainer.dist.rank}.safetensors")
"""


def test_torchrun_two_ranks_keep_alpha_and_both_networks_identical(tmp_path):
    """Each rank draws its own held-out batches; α's and the evaluation network's gradients are averaged
    like the weights', so every parameter stays equal across ranks (BatchNorm statistics stay per rank)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    r = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    torch.manual_seed(0)
    init = CDARTSSupernet(TINY, num_classes=10)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert not torch.equal(w0["search.alpha_normal"], init.search.alpha_normal)
    moved = [k for k in w0 if k.startswith("evalnet.") and not torch.equal(w0[k], dict(init.named_parameters())[k])]
    assert moved  # the evaluation network trained
