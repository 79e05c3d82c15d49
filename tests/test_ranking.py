"""Rank statistics, stratified arch picks, the accuracy predictor and predictor-guided evolution."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kendalltau

from vitnas import ArchConfig, SearchSpace
from vitnas.costs import ViTCostModel
from vitnas.search import Constraints, SearchConfig, build_strategy, run_search
from vitnas.search.predictor import AccuracyPredictor, encode_archs
from vitnas.search.ranking import rank_correlation, seed_noise, stratified_archs

SPACE = SearchSpace.preset("autoformer-tiny")
COSTS = ViTCostModel()


def score(arch: ArchConfig) -> float:
    """A structured stand-in for accuracy: width and heads help, the first layers' MLPs most."""
    early = sum(r * 0.8**i for i, r in enumerate(arch.mlp_ratios))
    return 50 + 0.04 * arch.embed_dim + 1.5 * np.mean(arch.num_heads) + early + 0.3 * arch.depth


def test_stratified_archs_cover_the_parameter_range():
    archs = stratified_archs(SPACE, 12, COSTS.params, seed=3)
    params = [COSTS.params(a) for a in archs]
    assert len({a.key() for a in archs}) == 12 and params == sorted(params)
    assert archs[0] == SPACE.smallest() and archs[-1] == SPACE.largest()
    edges = np.linspace(params[0], params[-1], 13)
    bins = np.digitize(params[1:-1], edges[1:-1])  # one interior pick per interior bin
    assert sorted(bins) == list(range(1, 11))
    assert stratified_archs(SPACE, 12, COSTS.params, seed=3) == archs
    assert stratified_archs(SPACE, 12, COSTS.params, seed=4) != archs
    with pytest.raises(ValueError, match="at least 2"):
        stratified_archs(SPACE, 1, COSTS.params)


def test_rank_correlation_and_its_interval():
    x = np.arange(10.0)
    r = rank_correlation(x, x**2, n_boot=300)
    assert r["kendall_tau"] == pytest.approx(1.0) and r["kendall_tau_ci"] == pytest.approx([1.0, 1.0])
    assert rank_correlation(x, -x, n_boot=300)["spearman_rho"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    noisy = x + rng.normal(0, 3, 10)
    r = rank_correlation(x, noisy, n_boot=500)
    lo, hi = r["kendall_tau_ci"]
    assert lo < r["kendall_tau"] < hi and hi - lo > 0.2  # ten noisy pairs: a wide interval
    assert r["kendall_tau"] == pytest.approx(kendalltau(x, noisy).statistic)
    with pytest.raises(ValueError, match="3\\+ scores"):
        rank_correlation([1, 2], [1, 2])


def test_seed_noise():
    assert seed_noise([50, 60], [52, 58]) == pytest.approx(np.sqrt(4 / 2))
    assert seed_noise([1.0], [1.0]) == 0.0


@pytest.mark.parametrize("kind", ["gbr", "rf", "mlp"])
def test_predictor_ranks_held_out_archs(kind):
    rng = np.random.default_rng(0)
    archs = list({a.key(): a for a in (SPACE.sample(rng) for _ in range(400))}.values())[:300]
    y = [score(a) + rng.normal(0, 0.3) for a in archs]
    pred = AccuracyPredictor(SPACE, kind).fit(archs[:200], y[:200]).predict(archs[200:])
    assert kendalltau(pred, y[200:]).statistic > 0.6
    assert encode_archs(archs, SPACE).min() >= 0 and encode_archs(archs, SPACE).max() <= 1
    with pytest.raises(ValueError, match="predictor='svm'"):
        AccuracyPredictor(SPACE, "svm")


def _search(name, tmp_path, seed, **kw):
    constraints = Constraints.from_dict({"params": [None, 7.0e6]})
    strategy = build_strategy(
        name, SPACE, feasible=lambda a: COSTS.params(a) <= 7.0e6, seed=seed, generations=6, population=10,
        parents=3, mutations=4, crossovers=4, **kw,
    )  # fmt: skip
    return run_search(
        strategy, lambda a: {"top1": score(a), "loss": 0.0}, costs={"params": COSTS.params, "macs": COSTS.macs},
        constraints=constraints, out_dir=tmp_path / f"{name}{seed}",
    )  # fmt: skip


def test_predictor_evolution_reaches_evolutions_best_with_fewer_evaluations(tmp_path):
    """At equal evaluations per generation, the predictor's pick of 10 out of 100 proposals finds a
    better arch sooner: it needs fewer evaluations to reach the best plain evolution ends with."""
    need_pred, need_evo = [], []
    for seed in range(3):
        evo = _search("evolution", tmp_path, seed)
        pred = _search("predictor-evolution", tmp_path, seed, predictor="gbr", pool=10)
        target = evo.best["top1"]

        def first_reaching(rows, target=target):
            return next(i + 1 for i, r in enumerate(rows) if r["top1"] >= target - 1e-9) if rows else None

        need_evo.append(first_reaching(evo.candidates))
        reached = first_reaching(pred.candidates) if pred.best["top1"] >= target - 1e-9 else len(pred.candidates) * 2
        need_pred.append(reached)
    assert np.mean(need_pred) < np.mean(need_evo)


def test_search_config_takes_the_predictor_settings():
    cfg = SearchConfig.from_dict({"strategy": "predictor-evolution", "predictor": "rf", "predictor_pool": 5})
    strategy = build_strategy(cfg.strategy, SPACE, **cfg.strategy_kwargs())
    assert (strategy.predictor, strategy.pool) == ("rf", 5)
    assert build_strategy("random", SPACE, **cfg.strategy_kwargs()).name == "random"  # settings of others dropped
    with pytest.raises(ValueError, match="predictor='xgb'"):
        SearchConfig.from_dict({"predictor": "xgb"})


def test_search_verdict_says_plainly_whether_search_beat_random():
    from vitnas.report import search_verdict

    def s(evo, rnd, se=0.5):
        strategies = {"evolution": {"best_top1": evo, "best_top1_standard_error": se}}
        strategies["random"] = {"best_top1": rnd, "best_top1_standard_error": se}
        return search_verdict(strategies)

    assert s(95.0, 92.0).startswith("evolution beat random search by 3.00")
    assert "did NOT clearly beat" in s(94.5, 94.0)
    assert "same best top-1" in s(94.0, 94.0)
    assert "0.50 points lower" in s(93.5, 94.0)
    assert search_verdict({"evolution": {"best_top1": 90.0}}) is None


def test_signal_and_paired_verdict_sentences():
    from vitnas.report import search_verdict, signal_sentence

    assert "rank these archs consistently" in signal_sentence({"tau": 0.5, "p_value": 1e-6, "candidates": 160})
    assert "weak but real" in signal_sentence({"tau": 0.15, "p_value": 0.01, "candidates": 160})
    assert "close to a lottery" in signal_sentence({"tau": 0.05, "p_value": 0.4, "candidates": 160})
    assert signal_sentence(None) is None
    strategies = {"evolution": {"best_top1": 90.0, "best_top1_standard_error": 1.3}}
    strategies["random"] = {"best_top1": 89.0, "best_top1_standard_error": 1.4}
    assert "did NOT clearly beat" in search_verdict(strategies)  # 1 point < two unpaired standard errors
    beat = search_verdict(strategies, {"main_only": 9, "random_only": 1, "p_value": 0.021})
    assert beat.startswith("evolution beat random search by 1.00 points") and "right on 9 images" in beat
    tie = search_verdict(strategies, {"main_only": 8, "random_only": 3, "p_value": 0.23})
    assert "did NOT clearly beat" in tie and "p=0.23" in tie


def test_equal_top1_goes_to_the_lower_validation_loss(tmp_path):
    """Top-1 on a small validation set moves in whole images: the loss breaks the tie."""
    archs = {}

    def evaluate(arch):
        archs[arch.key()] = arch
        return {"top1": 90.0, "loss": 1.0 + len(archs) * 0.01 if len(archs) != 7 else 0.5}

    strategy = build_strategy("random", SPACE, seed=0, generations=2, population=6)
    r = run_search(strategy, evaluate, costs={"params": COSTS.params}, constraints=Constraints(), out_dir=tmp_path)
    assert r.best["loss"] == 0.5
