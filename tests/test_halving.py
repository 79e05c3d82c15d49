"""Successive halving in the search: the validation split's two parts, scores that combine to the
whole split's, the promotion rule, and a halving search that is deterministic, keeps its best among fully
scored candidates, resumes after a crash and spreads over two ranks like one process."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_search import COSTS, SPACE, costs, fake_accuracy
from vitnas import ArchConfig, SearchSpace, ViTSupernet
from vitnas.data import AugmentConfig
from vitnas.data.datasets import Split
from vitnas.search import Constraints, Halving, Workers, build_strategy, run_search, torch_workers
from vitnas.search.evaluator import SplitHalves, SupernetEvaluator, stratified_parts

SCREEN, FINISH = 25, 75


def screen_score(arch):
    """A noisy look at fake_accuracy: what a quarter of the validation split sees."""
    noise = (sum(map(ord, arch.key())) % 101) / 50 - 1.0  # in [-1, 1], fixed per arch
    return {"top1": fake_accuracy(arch)["top1"] + 2 * noise, "loss": 1.0 + noise}


def finish_score(arch):
    """The other three quarters: together with the screen, exactly fake_accuracy."""
    s, full = screen_score(arch), fake_accuracy(arch)
    return {k: (full[k] * (SCREEN + FINISH) - s[k] * SCREEN) / FINISH for k in ("top1", "loss")}


def halving_search(out: Path, workers: Workers | None = None, screen=screen_score, keep=0.5, generations=4):
    constraints = Constraints.from_dict({"params": [None, 8.0e6]})
    feasible = lambda a: constraints.satisfied({k: f(a) for k, f in costs().items()})  # noqa: E731
    strategy = build_strategy(
        "evolution", SPACE, feasible=feasible, cost=COSTS.params, seed=1, generations=generations, population=12,
        parents=4, mutations=4, crossovers=4,
    )  # fmt: skip
    halving = Halving(screen, finish_score, SCREEN, FINISH, keep)
    return run_search(
        strategy, None, costs=costs(), constraints=constraints, out_dir=out, workers=workers, halving=halving
    )


def test_stratified_parts_split_every_class():
    labels = np.repeat(np.arange(4), [8, 4, 1, 20])
    head, tail = stratified_parts(labels, 0.25, seed=3)
    assert np.array_equal(np.sort(np.concatenate([head, tail])), np.arange(len(labels)))
    assert [int((labels[head] == c).sum()) for c in range(4)] == [2, 1, 1, 5]
    assert np.array_equal(head, stratified_parts(labels, 0.25, seed=3)[0])
    assert not np.array_equal(head, stratified_parts(labels, 0.25, seed=4)[0])


def test_the_two_parts_combine_to_the_score_of_the_whole_split():
    space = SearchSpace.preset("digits")
    torch.manual_seed(0)
    net = ViTSupernet(space, num_classes=10)
    split = Split(torch.arange(60) % 10, images=torch.randint(0, 256, (60, 3, 16, 16), dtype=torch.uint8))
    evaluator = SupernetEvaluator(net, split, img_size=16, norm=AugmentConfig(), batch_size=16)
    screen, finish = evaluator.parts(0.25)
    assert (len(screen), len(finish)) == (20, 40)  # ceil(0.25 * 6) = 2 of each class
    halving = Halving(screen, finish, len(screen), len(finish))
    for arch in (space.smallest(), space.largest(), space.sample(np.random.default_rng(0))):
        whole, parts = evaluator(arch), halving.combine(screen(arch), finish(arch))
        assert parts["val_images"] == 60
        assert parts["top1"] == pytest.approx(whole["top1"], abs=1e-9)
        assert parts["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    with pytest.raises(ValueError, match="fraction"):
        evaluator.parts(1.0)
    halves = SplitHalves(evaluator)  # what the pipeline scores with when it does not halve
    for arch in (space.smallest(), space.largest()):
        whole, both = evaluator(arch), halves(arch)
        assert both["top1"] == pytest.approx(whole["top1"], abs=1e-9) and len(both["val_halves"]) == 2
        assert sum(both["val_halves"]) / 2 == pytest.approx(whole["top1"], abs=1e-9)  # equal halves of 60


def test_promotion_takes_pareto_fronts_first():
    rows = [  # (top1, params): a and d are on the first front; b is dominated by a; c only by d
        {"key": "a", "top1": 90.0, "params": 5.0},
        {"key": "b", "top1": 85.0, "params": 6.0},
        {"key": "c", "top1": 70.0, "params": 2.0},
        {"key": "d", "top1": 80.0, "params": 1.0},
    ]
    h = Halving(None, None, 1, 1, keep=0.5)
    assert h.promote(rows, "params") == {"a", "d"}  # the cheap d goes on although b scores higher
    assert Halving(None, None, 1, 1, keep=0.75).promote(rows, "params") == {"a", "d", "b"}  # then by top-1
    assert Halving(None, None, 1, 1, keep=0.01).promote(rows, "params") == {"a"}  # at least one


def test_halving_search_finishes_the_kept_share_and_picks_its_best_among_them(tmp_path):
    result = halving_search(tmp_path / "a")
    again = halving_search(tmp_path / "b")
    assert [r["key"] for r in result.candidates] == [r["key"] for r in again.candidates]
    by_gen: dict[int, list[dict]] = {}
    for row in result.candidates:
        by_gen.setdefault(row["generation"], []).append(row)
    for rows in by_gen.values():
        full = [r for r in rows if not r.get("screened_out")]
        assert len(full) == math.ceil(0.5 * len(rows))
        for r in full:  # a finished candidate carries its whole-split score
            assert r["val_images"] == SCREEN + FINISH
            assert r["top1"] == pytest.approx(fake_accuracy(ArchConfig.from_dict(r["arch"]))["top1"])
        assert all(r["val_images"] == SCREEN for r in rows if r.get("screened_out"))
    assert not result.best.get("screened_out")
    assert all(not r.get("screened_out") for r in result.front)
    full_rows = [r for r in result.candidates if not r.get("screened_out")]
    assert result.best["top1"] == max(r["top1"] for r in full_rows)
    assert result.best_per_generation[-1] == result.best["top1"]


def test_halving_search_resumes_after_a_crash(tmp_path):
    whole = halving_search(tmp_path / "whole")
    calls = []

    def crashing(arch):
        calls.append(arch)
        if len(calls) == 20:  # inside the second generation's screening
            raise KeyboardInterrupt
        return screen_score(arch)

    with pytest.raises(KeyboardInterrupt):
        halving_search(tmp_path / "part", screen=crashing)
    resumed = halving_search(tmp_path / "part")
    for name in ("candidates.jsonl", "pareto.json", "best.yaml", "progress.json"):
        assert (tmp_path / "part" / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert resumed.best["key"] == whole.best["key"]


def _rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20)
    )
    try:
        halving_search(Path(out), torch_workers())
    finally:
        dist.destroy_process_group()


def test_two_ranks_halve_like_one_process(tmp_path):
    halving_search(tmp_path / "one")
    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "two")), nprocs=2, start_method="spawn")
    for name in ("candidates.jsonl", "state.json", "pareto.json", "best.yaml", "progress.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


def test_search_config_names_bad_halving_and_amp_values():
    from vitnas.search import SearchConfig

    assert SearchConfig.from_dict({"halving": 0.25, "halving_keep": 0.5, "amp": "bf16"}).halving == 0.25
    for bad, match in (
        ({"halving": 1.0}, "halving=1.0; expected 0 \\(off\\) or a share"),
        ({"halving": -0.1}, "halving=-0.1"),
        ({"halving_keep": 0.0}, "halving_keep=0.0; expected a share of candidates in \\(0, 1\\]"),
        ({"amp": "half"}, "amp='half'; expected one of"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            SearchConfig.from_dict(bad, source="cfg.yaml: search")
