"""The space-search rule (E-T error, range shifts) on synthetic errors whose optimum is known."""

from __future__ import annotations

import numpy as np
import pytest

from vitnas.search.space_search import et_error, grid_around, shift_ranges

OPT = {"depth": 14, "ratio": 1.0}
GRIDS = {"depth": tuple(range(1, 21)), "ratio": tuple(np.round(np.arange(0.5, 5.01, 0.5), 6))}


def synthetic_error(values, rng):
    """A bowl with its floor at OPT, plus measurement noise."""
    return (
        20 + (values["depth"] - OPT["depth"]) ** 2 / 10 + 3 * (values["ratio"] - OPT["ratio"]) ** 2 + rng.normal(0, 0.5)
    )


def sample(ranges, n, rng):
    return [{k: float(rng.choice(v)) for k, v in ranges.items()} for _ in range(n)]


def test_ranges_move_toward_the_optimum_and_stop_there():
    rng = np.random.default_rng(0)
    ranges = {"depth": (2, 3, 4), "ratio": (3.5, 4.0, 4.5)}
    history = []
    for _ in range(16):
        values = sample(ranges, 120, rng)
        samples = [(v, synthetic_error(v, rng)) for v in values]
        history.append(et_error([e for _, e in samples], top_k=10)["ET"])
        ranges, shifts = shift_ranges(ranges, GRIDS, samples, min_t=2.0)
        assert {s.name for s in shifts} == {"depth", "ratio"}
        for name, window in ranges.items():  # windows keep their size and stay consecutive on the grid
            i = GRIDS[name].index(window[0])
            assert window == GRIDS[name][i : i + 3]
    assert OPT["depth"] - 1 <= np.mean(ranges["depth"]) <= OPT["depth"] + 1
    assert OPT["ratio"] - 0.5 <= np.mean(ranges["ratio"]) <= OPT["ratio"] + 0.5
    assert history[-1] < history[0] - 10  # the E-T error fell with the moves


def test_no_significant_trend_no_move_and_grid_edges_hold():
    rng = np.random.default_rng(1)
    flat = [({"depth": float(rng.choice((5, 6, 7))), "ratio": 1.0}, 20 + rng.normal(0, 1)) for _ in range(60)]
    ranges, shifts = shift_ranges({"depth": (5, 6, 7), "ratio": (0.5, 1.0, 1.5)}, GRIDS, flat, min_t=3.0)
    assert ranges == {"depth": (5, 6, 7), "ratio": (0.5, 1.0, 1.5)}
    by = {s.name: s for s in shifts}
    assert by["ratio"].slope == 0 and by["ratio"].t == 0  # no variation: nothing to fit
    edge = [({"depth": d, "ratio": 1.0}, 30 - d) for d in (18, 19, 20) * 10]  # better upward, at the grid's end
    ranges, _ = shift_ranges({"depth": (18, 19, 20), "ratio": (1.0,)}, GRIDS, edge)
    assert ranges["depth"] == (18, 19, 20)


def test_et_error_and_grids():
    assert et_error([10, 20, 30, 40], top_k=2) == {"E": 25.0, "T": 15.0, "ET": 20.0}
    assert grid_around([64, 96], 2, integer=True) == (32, 64, 96, 128, 160)
    assert grid_around([2.0, 3.0, 4.0], 1, integer=False) == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert grid_around([7], 2, integer=True) == (5, 6, 7, 8, 9)
    with pytest.raises(ValueError, match="choices \\[7\\] are not on its grid"):
        shift_ranges({"depth": (7,)}, {"depth": (1, 2)}, [({"depth": 7}, 1.0)] * 5)
    with pytest.raises(ValueError, match="cannot fit slopes"):
        shift_ranges({"depth": (1,)}, {"depth": (1, 2)}, [({"depth": 1}, 1.0)] * 2)


def _config(tmp_path, out: str, **kw):
    from vitnas.pipeline.space_search import SpaceSearchConfig

    train = dict(recipe="digits", val_per_class=10, batch_size=64, lr=1e-2, warmup_epochs=0.2, drop_path=0.0)
    train.update(threads=1, deterministic=True)
    settings = dict(iterations=2, epochs=1, finetune_epochs=1, samples=10, top_k=3, min_t=0.5)
    return SpaceSearchConfig(
        out_dir=str(tmp_path / out), space="digits", dims=["embed_dim", "depth"], train=train, **{**settings, **kw}
    )


def test_space_search_runs_iterations_and_resumes_after_an_interrupt_to_the_same_result(tmp_path):
    """Two spaces on the digits ViT space; one run is interrupted while scoring the second space's samples and
    continued: the same E-T errors, ranges and final space. Plots and per-iteration YAMLs are written."""
    import json

    from vitnas.pipeline.space_search import run_space_search
    from vitnas.space import load_space

    full = run_space_search(_config(tmp_path, "full"))
    assert len(full["iterations"]) == 2
    for name in ("et_error.png", "ranges.png", "final_space.yaml", "iter_0/space.yaml", "iter_1/result.json"):
        assert (tmp_path / "full" / name).is_file(), name
    first = json.loads((tmp_path / "full" / "iter_0" / "result.json").read_text())
    assert first["next_ranges"] == full["iterations"][1]["ranges"]
    final = load_space(full["final_space"])  # feeds `vitnas search` as any space YAML
    assert list(final.embed_dim) == full["iterations"][1]["ranges"]["embed_dim"]

    def interrupt(stage, done, total):
        if stage == "score 1" and done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_space_search(_config(tmp_path, "part"), interrupt)
    assert len((tmp_path / "part" / "iter_1" / "samples.jsonl").read_text().splitlines()) == 4
    again = run_space_search(_config(tmp_path, "part"))
    assert again["iterations"] == full["iterations"]


def test_space_search_config_errors(tmp_path):
    from vitnas.pipeline.space_search import SpaceSearchConfig, run_space_search

    with pytest.raises(ValueError, match="train.epochs is set by the space search"):
        SpaceSearchConfig(train={"epochs": 3})
    with pytest.raises(ValueError, match="unknown dims \\['width'\\]"):
        run_space_search(SpaceSearchConfig(out_dir=str(tmp_path), space="digits", dims=["width"]))
    with pytest.raises(ValueError, match="has no searchable ranges"):
        run_space_search(SpaceSearchConfig(out_dir=str(tmp_path), space="cream-cifar"))


def test_space_search_on_the_s3_space(tmp_path):
    """The S3 hierarchical space searched by stage dimensions (`<dim>.<stage>`), its supernet sized for the grids."""
    from vitnas.pipeline.space_search import SpaceSearchConfig, run_space_search
    from vitnas.space import load_space

    train = dict(recipe="digits", val_per_class=10, batch_size=64, lr=1e-2, warmup_epochs=0.2, threads=1)
    cfg = SpaceSearchConfig(
        out_dir=str(tmp_path / "s3"),
        space="s3-cifar",
        dims=["embed_dims.2", "depths.2", "num_heads.2"],
        grid_extend=1,
        iterations=2,
        epochs=1,
        finetune_epochs=1,
        samples=8,
        top_k=2,
        min_t=0.0,  # every slope moves its window: the second space differs from the first
        train=train,
    )
    summary = run_space_search(cfg)
    first, second = (it["ranges"] for it in summary["iterations"])
    assert first["embed_dims.2"] == [64, 96] and first != second
    final = load_space(summary["final_space"])
    assert [list(final.embed_dims[2]), list(final.depths[2]), list(final.num_heads[2])] == [
        second["embed_dims.2"],
        second["depths.2"],
        second["num_heads.2"],
    ]
    assert final.max_embed_dims[2] == 128 and final.embed_dims[0] == (16, 24)  # capacity = grid top; others kept


def test_a_sample_line_cut_by_a_kill_is_scored_again(tmp_path):
    """kill -9 can stop a run mid-line in samples.jsonl: the cut line is dropped and that arch scored again."""
    from vitnas.pipeline.space_search import run_space_search

    full = run_space_search(_config(tmp_path, "full", iterations=1))
    samples = tmp_path / "full" / "iter_0" / "samples.jsonl"
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])  # three whole lines and a cut one
    (tmp_path / "full" / "iter_0" / "result.json").unlink()
    again = run_space_search(_config(tmp_path, "full", iterations=1))
    assert again["iterations"] == full["iterations"]
    assert samples.read_text().splitlines() == lines
