"""Cream's prioritized board, meta-matching and look-ahead, on a tiny ViT supernet (the MBConv supernet is
tested in test_cream_models.py and by the pipeline test below)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitnas import SearchSpace
from vitnas.supernet.vit import ViTSupernet
from vitnas.train.tasks.cream import Board, BoardEntry, CreamConfig, lookahead_meta_grads, match_teacher

SPACE = SearchSpace(
    embed_dim=(16, 24),
    depth=(1, 2),
    mlp_ratio=(1.0, 2.0),
    num_heads=(1, 2),
    head_dim=8,
    img_size=8,
    patch_size=4,
    rel_pos_max=2,
    name="micro",
)


def entry(name: str, top1: float, macs: int) -> BoardEntry:
    return BoardEntry(name, top1, macs, torch.zeros(1), torch.zeros(1))


def test_board_admits_by_the_reference_rule_and_orders_ties_by_larger_macs():
    board = Board(3, acc_gap=5.0)
    for e in (entry("a", 50.0, 100), entry("b", 60.0, 100), entry("c", 50.0, 200)):
        assert board.offer(e)  # room on the board
    # equal top-1: the larger path first (the reference sorts (top1, flops) tuples in reverse)
    assert board.archs() == ["b", "c", "a"]
    assert board.entries[-1].arch == "a"
    assert not board.offer(entry("d", 54.0, 150))  # better than the worst, but not cheaper nor 5 points better
    assert not board.offer(entry("e", 50.0, 10))  # cheaper but not better
    assert board.offer(entry("f", 50.5, 90))  # better and cheaper than the worst ("a", 50.0 at 100)
    assert board.archs() == ["b", "f", "c"]
    assert not board.offer(entry("g", 55.0, 10_000))  # 4.5 points above the worst (50.0): gap not cleared
    assert board.offer(entry("h", 55.01, 10_000))  # more than acc_gap above the worst
    assert board.archs() == ["b", "h", "f"]
    assert board.offer(entry("b", 70.0, 100)) and board.archs() == ["b", "h", "f"]  # a path keeps one slot
    assert board.entries[0].top1 == 70.0 and len(board) == 3
    assert [d["top1"] for d in Board(2).describe()] == []


def test_cream_config_names_bad_values():
    with pytest.raises(ValueError, match="cream: unknown key 'boardsize'"):
        CreamConfig.from_dict({"boardsize": 3})
    with pytest.raises(ValueError, match="pick='best'"):
        CreamConfig.from_dict({"pick": "best"})
    from vitnas.train import TrainConfig

    with pytest.raises(ValueError, match="max_mmacs=1.0 is below min_mmacs=2.0"):
        TrainConfig(min_mmacs=2.0, max_mmacs=1.0)


def test_paths_are_drawn_inside_the_macs_window():
    from vitnas.train import TrainConfig
    from vitnas.train.tasks import sample_step_archs

    net = ViTSupernet(SPACE, num_classes=5)
    macs = sorted(net.num_macs(SPACE.sample(np.random.default_rng(i))) for i in range(50))
    lo, hi = macs[15] / 1e6, macs[35] / 1e6
    cfg = TrainConfig(space="cifar", min_mmacs=lo, max_mmacs=hi)
    for step in range(30):
        (arch,) = sample_step_archs(SPACE, cfg, step, net.num_macs)
        assert lo * 1e6 <= net.num_macs(arch) <= hi * 1e6
    with pytest.raises(ValueError, match="no subnet of space 'micro' in the MACs window"):
        sample_step_archs(SPACE, TrainConfig(space="cifar", min_mmacs=1e6), 0, net.num_macs)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    net = ViTSupernet(SPACE, num_classes=5)
    rng = np.random.default_rng(seed)
    board = Board(3)
    for i in range(3):
        arch = SPACE.sample(rng)
        images = torch.randn(4, 3, 8, 8)
        with torch.no_grad(), net.active(arch):
            probs = torch.softmax(net(images), -1)
        board.offer(BoardEntry(arch, 50.0 + i, net.num_macs(arch), images, probs))
    meta = torch.nn.Linear(4 * 5, 1)
    return net, board, meta, SPACE.sample(rng)


def test_meta_gradient_flows_only_through_the_lookahead():
    net, board, meta, student = _setup()
    x_kd, x_val, y_val = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    kwargs = dict(pick="meta")
    frozen = lookahead_meta_grads(net, meta, board, student, x_kd, x_val, y_val, lr=0.0, **kwargs)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in frozen)  # no step: no way to the meta layer
    grads = lookahead_meta_grads(net, meta, board, student, x_kd, x_val, y_val, lr=0.5, **kwargs)
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads)
    assert all(p.grad is None for p in net.parameters()) and all(p.grad is None for p in meta.parameters())


def test_lookahead_gradient_matches_finite_differences_of_the_meta_bias():
    """d L_val(w - lr * g(meta)) / d meta_bias, by autograd and by central differences."""
    net, board, meta, student = _setup(1)
    net.eval()  # no BatchNorm here; eval keeps dropout / drop-path off for the difference quotient
    net.double()
    meta.double()
    for e in board.entries:
        e.images, e.probs = e.images.double(), e.probs.double()
    x_kd, x_val, y_val = torch.randn(4, 3, 8, 8).double(), torch.randn(4, 3, 8, 8).double(), torch.randint(0, 5, (4,))
    lr = 0.3
    grads = lookahead_meta_grads(net, meta, board, student, x_kd, x_val, y_val, pick="meta", lr=lr)

    def val_loss_at(bias: float) -> float:
        with torch.no_grad():
            meta.bias.fill_(bias)
        m, entry = match_teacher(net, meta, board, student, pick="meta")
        with torch.no_grad(), net.active(entry.arch):
            soft = torch.softmax(net(x_kd), -1)
        params = [p for p in net.parameters()]
        with net.active(student):
            kd = m * torch.sum(-soft * torch.log_softmax(net(x_kd), -1), -1).mean()
            g = torch.autograd.grad(kd, params, allow_unused=True)
        with torch.no_grad():
            saved = [p.clone() for p in params]
            for p, gi in zip(params, g):
                if gi is not None:
                    p -= lr * gi
            with net.active(student):
                loss = float(torch.nn.functional.cross_entropy(net(x_val), y_val))
            for p, s in zip(params, saved):
                p.copy_(s)
        return loss

    b0, eps = float(meta.bias.detach()), 1e-5
    numeric = (val_loss_at(b0 + eps) - val_loss_at(b0 - eps)) / (2 * eps)
    torch.testing.assert_close(float(grads[1]), numeric, rtol=1e-4, atol=1e-9)


def test_top1_pick_takes_the_best_entry_with_even_weight():
    net, board, meta, student = _setup()
    m, chosen = match_teacher(net, meta, board, student, pick="top1")
    assert chosen is board.entries[0] and float(m) == 0.5
    m, chosen = match_teacher(net, meta, board, student, pick="meta")
    assert 0 < float(m.detach()) < 1 and m.requires_grad and chosen in board.entries


def _cream_pipeline(tmp_path, space: str, strategy: str, **search):
    from vitnas.pipeline import PipelineConfig, run_pipeline

    train = dict(space=space, recipe="digits", val_per_class=10, epochs=2, batch_size=64, lr=1e-2, warmup_epochs=0.5)
    train.update(drop_path=0.0, threads=1, task="cream", cream={"start_epoch": 1, "meta_every": 2, "board_size": 4})
    cfg = {
        "out_dir": str(tmp_path / "run"),
        "train": train,
        "search": {"strategy": strategy, "population": 4, "generations": 2, "parents": 2, **search},
        "baseline": False,
    }
    path = tmp_path / "cream.yaml"
    path.write_text(__import__("yaml").safe_dump(cfg))
    return run_pipeline(PipelineConfig.from_yaml(path))


def test_cream_pipeline_searches_the_board_and_seeds_evolution_with_it(tmp_path):
    import json

    from vitnas.train import read_checkpoint

    _cream_pipeline(tmp_path, "digits", "board")
    _, meta = read_checkpoint(tmp_path / "run" / "supernet" / "last.safetensors", only=())
    board = meta["cream"]["board"]
    assert len(board) == 4 and meta["cream"]["meta_updates"] > 0
    assert [e["top1"] for e in board] == sorted((e["top1"] for e in board), reverse=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "search" / "board" / "candidates.jsonl").open()]
    assert sorted(r["key"] for r in rows) == sorted(SPACE_OF_DIGITS.arch_from_dict(e["arch"]).key() for e in board)
    # evolution from the board: its first generation opens with the board's paths
    _cream_pipeline(tmp_path, "digits", "evolution", from_board=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "search" / "evolution" / "candidates.jsonl").open()]
    first = [r["key"] for r in rows if r["generation"] == 0]
    assert first == [SPACE_OF_DIGITS.arch_from_dict(e["arch"]).key() for e in board]


SPACE_OF_DIGITS = SearchSpace.preset("digits")


def test_recalibrated_batchnorm_uses_the_paths_own_statistics_and_restores_the_shared_ones():
    from vitnas.evaluation import recalibrated_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5)).train()
    net[1].running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [torch.randn(8, 3, 5, 5) + 2, torch.randn(8, 3, 5, 5) + 2]
    with torch.no_grad():
        feats = [net[0](x) for x in batches]
    with recalibrated_batchnorm(net, batches):  # the cumulative average over batches of their statistics
        assert not net.training
        torch.testing.assert_close(net[1].running_mean, sum(f.mean((0, 2, 3)) for f in feats) / 2)
        torch.testing.assert_close(net[1].running_var, sum(f.var((0, 2, 3)) for f in feats) / 2)
    assert net.training and net[1].momentum == 0.1
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with recalibrated_batchnorm(net, None):  # nothing to calibrate on: untouched
        assert net.training


def test_cream_on_the_mbconv_supernet_end_to_end(tmp_path):
    """Cream training, board search, export (BN statistics of the winner) and its test score on the MBConv
    space: the pipeline never asks which supernet it holds."""
    import json

    summary = _cream_pipeline(tmp_path, "cream-cifar", "board")
    folder = tmp_path / "run" / "export"
    assert (folder / "model.safetensors").is_file()
    from vitnas.export import load_subnet

    model = load_subnet(folder)
    assert type(model).__name__ == "CreamNet"
    rows = [json.loads(x) for x in (tmp_path / "run" / "search" / "board" / "candidates.jsonl").open()]
    assert len(rows) == 4 and summary["best"]["arch"] in [r["key"] for r in rows]


def test_cli_space_and_costs_take_the_mbconv_space(tmp_path, capsys):
    from vitnas.cli import main as cli_main
    from vitnas.space import MBConvSpace
    from vitnas.supernet import build_supernet

    space = MBConvSpace.preset("cream-cifar")
    arch = space.sample(np.random.default_rng(3))
    arch.to_yaml(tmp_path / "a.yaml")
    assert cli_main(["costs", str(tmp_path / "a.yaml"), "--space", "cream-cifar", "--num-classes", "10"]) == 0
    params = build_supernet(space, img_size=32, num_classes=10).num_params(arch)
    assert f"{arch.key()}: {params:,} parameters" in capsys.readouterr().out
    assert cli_main(["space", "--space", "cream-cifar", "--samples", "1", "--num-classes", "10"]) == 0
    assert "extracted model agrees to 0.0e+00" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("stages: [[9], [0], [0], [0], [0]]\n")
    assert cli_main(["costs", str(tmp_path / "bad.yaml"), "--space", "cream-cifar"]) != 0
    assert "bad.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["evolution", "nsga2", "predictor-evolution"])
def test_every_strategy_searches_and_resumes_on_the_mbconv_space(tmp_path, name):
    """Strategies know the space only through its protocol (sample / mutate / crossover / genome / features)."""
    from _search_protocol import check_search_and_resume
    from vitnas.space import MBConvSpace

    space = MBConvSpace.preset("cream-cifar")
    net = build_supernet_meta(space)

    def accuracy(arch):  # deeper and wider kernels score higher, penalised by MACs
        k = sum(space.ops[o][0] for s in arch.stages for o in s)
        return {"top1": 50 + k / 3 - net.num_macs(arch) / 2e5, "loss": 1.0}

    full = check_search_and_resume(tmp_path, name, space, net, accuracy, max_macs=3.0e6, crash_at=20)
    assert full.best["top1"] > np.median([r["top1"] for r in full.candidates])


def build_supernet_meta(space):
    from vitnas.supernet import build_supernet

    with torch.device("meta"):
        return build_supernet(space, img_size=space.img_size, num_classes=10)
