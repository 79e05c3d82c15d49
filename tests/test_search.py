from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitnas import ArchConfig, SearchSpace, ViTSupernet
from vitnas.costs import ViTCostModel
from vitnas.export import export_subnet, load_subnet
from vitnas.search import Constraints, InfeasibleConstraint, build_strategy, pareto_front, run_search

SPACE = SearchSpace.preset("autoformer-tiny")
COSTS = ViTCostModel()


def fake_accuracy(arch: ArchConfig) -> dict[str, float]:
    """A deterministic, arch-dependent stand-in for a supernet evaluation."""
    score = 60 + 0.05 * arch.embed_dim + 0.8 * sum(arch.num_heads) / arch.depth + sum(arch.mlp_ratios) / arch.depth
    return {"top1": score - abs(COSTS.params(arch) / 1e6 - 7.5), "loss": 1.0}


def costs():
    return {"params": COSTS.params, "macs": COSTS.macs}


def run(name, tmp_path, constraints=None, seed=0, generations=4, evaluate=fake_accuracy, resume=True):
    constraints = constraints or Constraints.from_dict({"params": [None, 8.0e6]})
    feasible = lambda a: constraints.satisfied({k: f(a) for k, f in costs().items()})  # noqa: E731
    strategy = build_strategy(
        name,
        SPACE,
        feasible=feasible,
        cost=COSTS.params,
        seed=seed,
        generations=generations,
        population=20,
        parents=5,
        mutations=8,
        crossovers=8,
    )
    return run_search(
        strategy, evaluate, costs=costs(), constraints=constraints, out_dir=tmp_path / name, resume=resume
    )


@pytest.mark.parametrize("name", ["evolution", "random", "nsga2", "predictor-evolution"])
def test_strategies_are_deterministic_constrained_and_deduplicated(tmp_path, name):
    window = Constraints.from_dict({"params": [6.0e6, 8.0e6], "macs": [None, 1.8e9]})
    a = run(name, tmp_path / "a", window)
    b = run(name, tmp_path / "b", window)
    keys = [r["key"] for r in a.candidates]
    assert keys == [r["key"] for r in b.candidates] and len(keys) > 40
    assert len(set(keys)) == len(keys)  # never evaluated twice
    for r in a.candidates:
        assert 6.0e6 <= r["params"] <= 8.0e6 and r["macs"] <= 1.8e9
        assert SPACE.contains(ArchConfig.from_dict(r["arch"]))
    c = run(name, tmp_path / "c", window, seed=1)
    assert [r["key"] for r in c.candidates] != keys
    lines = (tmp_path / "a" / name / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == len(keys) and (tmp_path / "a" / name / "best.yaml").is_file()


def test_evolution_beats_random_on_a_structured_objective(tmp_path):
    evo = [run("evolution", tmp_path / f"e{s}", seed=s, generations=6).best["top1"] for s in range(3)]
    rnd = [run("random", tmp_path / f"r{s}", seed=s, generations=6).best["top1"] for s in range(3)]
    assert np.mean(evo) > np.mean(rnd)


def test_infeasible_constraint_fails_at_once():
    with pytest.raises(
        InfeasibleConstraint, match=r"params in \[0, 1e\+06\].*range over \[5\.3\d*e\+06, 1\.0\d*e\+07\]"
    ):
        Constraints.from_dict({"params": [None, 1e6]}).check_feasible(SPACE, costs())
    with pytest.raises(ValueError, match="unknown constraint 'flops'"):
        Constraints.from_dict({"flops": [0, 1]})
    with pytest.raises(ValueError, match="min 5 is above max 2"):
        Constraints.from_dict({"params": [5, 2]})


@pytest.mark.parametrize("name", ["evolution", "nsga2", "predictor-evolution"])
def test_interrupted_search_resumes_to_the_same_result(tmp_path, name):
    full = run(name, tmp_path / "full", generations=4)
    calls = []

    def crashing(arch):
        calls.append(arch)
        if len(calls) == 45:  # mid-way through the third generation
            raise KeyboardInterrupt
        return fake_accuracy(arch)

    with pytest.raises(KeyboardInterrupt):
        run(name, tmp_path / "part", generations=4, evaluate=crashing)
    evaluated_before = len(calls) - 1
    again = []

    def counting(arch):
        again.append(arch)
        return fake_accuracy(arch)

    resumed = run(name, tmp_path / "part", generations=4, evaluate=counting)
    assert [r["key"] for r in resumed.candidates] == [r["key"] for r in full.candidates]
    assert resumed.best["key"] == full.best["key"]
    assert evaluated_before + len(again) == len(full.candidates)  # nothing evaluated twice
    state = json.loads((tmp_path / "part" / name / "state.json").read_text())
    assert state["strategy"]["generation"] == 4


def test_pareto_front():
    rows = [{"top1": 90, "params": 5}, {"top1": 80, "params": 3}, {"top1": 85, "params": 6}, {"top1": 95, "params": 9}]
    assert [r["params"] for r in pareto_front(rows, "params")] == [3, 5, 9]


def test_export_round_trip_and_onnx(tmp_path):
    space = SearchSpace.preset("cifar")
    net = ViTSupernet(space, num_classes=10).eval()
    arch = space.sample(np.random.default_rng(0))
    model = net.extract(arch)
    export_subnet(model, tmp_path / "exp", extra={"note": "test"}, onnx=True)
    assert {p.name for p in (tmp_path / "exp").iterdir()} == {
        "model.safetensors",
        "arch.yaml",
        "config.json",
        "model.onnx",
    }
    loaded = load_subnet(tmp_path / "exp")
    assert type(loaded).__module__ == "vitnas.models.vit" and loaded.arch == arch
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "exp" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    assert np.abs(got - model(x).detach().numpy()).max() <= 1e-4
    assert ArchConfig.from_yaml(tmp_path / "exp" / "arch.yaml") == arch
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_subnet(tmp_path)


def test_resuming_with_other_settings_is_refused_and_fresh_starts_over(tmp_path):
    run("evolution", tmp_path, generations=2)
    narrower = Constraints.from_dict({"params": [None, 7.0e6]})
    with pytest.raises(ValueError, match=r"holds a search made with other settings \(constraints"):
        run("evolution", tmp_path, narrower, generations=2)
    fresh = run("evolution", tmp_path, narrower, generations=2, resume=False)
    assert all(r["params"] <= 7.0e6 for r in fresh.candidates)
    assert all(
        json.loads(line)["params"] <= 7.0e6
        for line in (tmp_path / "evolution" / "candidates.jsonl").read_text().splitlines()
    )


def test_a_line_cut_by_a_crash_is_dropped_and_re_evaluated(tmp_path):
    full = run("random", tmp_path / "a", generations=2)
    path = tmp_path / "a" / "random" / "candidates.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:15])  # torn last line, no state change
    (tmp_path / "a" / "random" / "state.json").unlink()  # crashed before the first state write
    again = run("random", tmp_path / "a", generations=2)
    assert [r["key"] for r in again.candidates] == [r["key"] for r in full.candidates]
    assert all(json.loads(x) for x in path.read_text().splitlines())


def test_search_log_names_the_strategy_and_counts_generations_from_zero(tmp_path, caplog):
    with caplog.at_level("INFO", logger="vitnas"):
        run("random", tmp_path / "r", generations=2)
        run("evolution", tmp_path / "e", generations=2)
    lines = [r.getMessage().split(":")[0] for r in caplog.records if " generation " in r.getMessage()]
    assert lines == ["random generation 0", "random generation 1", "evolution generation 0", "evolution generation 1"]


def test_progress_plot_numbers_generations_like_the_log_and_shows_the_noise(tmp_path, monkeypatch):
    from vitnas import report

    figs = []
    monkeypatch.setattr(report, "_save", lambda plt, fig, path: figs.append(fig) or path)
    report.plot_progress(
        {"evolution": [70.0, 70.5, 71.0], "random": [70.0, 70.0, 70.5]}, tmp_path / "p.png", val_images=200
    )
    ax = figs[0].axes[0]
    assert [list(line.get_xdata()) for line in ax.lines] == [[0, 1, 2], [0, 1, 2]]  # as "generation 0.." in the log
    lo, hi = ax.get_ylim()
    assert hi - lo >= 5.0  # a one-image (0.5 point) gap on 200 images does not fill the plot
    se = report.top1_standard_error(71.0, 200)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # the first strategy's +-1 s.e. band
    assert band.max() == pytest.approx(71.0 + se) and band.min() == pytest.approx(
        70.0 - report.top1_standard_error(70.0, 200)
    )
