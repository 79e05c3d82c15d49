from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from vitnas import SearchSpace, ViTSupernet
from vitnas.cli import main as cli_main
from vitnas.costs.latency import LatencyTable
from vitnas.export import load_subnet
from vitnas.pipeline import PipelineConfig, run_pipeline

QUICK = {
    "train": {
        "space": "digits",
        "recipe": "digits",
        "val_per_class": 20,
        "epochs": 2,
        "batch_size": 64,
        "lr": 1e-2,
        "warmup_epochs": 0.5,
        "drop_path": 0.0,
        "threads": 1,
    },
    "search": {
        "strategy": "evolution",
        "population": 6,
        "generations": 2,
        "parents": 3,
        "mutations": 2,
        "crossovers": 2,
        "constraints": {"params": [None, 120000], "latency_ms": [None, 1000]},
    },
    "finetune_epochs": 1,
    "onnx": True,
    "latency_check": 2,
}


def summary_rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "search" / "evolution" / "candidates.jsonl").open()]


def test_pipeline_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITNAS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({**QUICK, "out_dir": str(tmp_path / "run")}))
    assert cli_main(["search", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out and "best subnet" in out and "exported to" in out
    run = tmp_path / "run"
    for name in (
        "candidates.png",
        "progress.png",
        "summary.json",
        "search/evolution/candidates.jsonl",
        "search/evolution/pareto.json",
        "search/evolution/best.yaml",
        "search/random/candidates.jsonl",
        "export/model.safetensors",
        "export/arch.yaml",
        "export/config.json",
        "export/model.onnx",
    ):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategies"]["evolution"]["evaluations"] == summary["strategies"]["random"]["evaluations"] == 12
    assert summary["best"]["params"] <= 120000
    assert summary["latency_table"]["n"] == 2
    model = load_subnet(run / "export")
    assert model.num_classes == 10
    # The exported weights are the fine-tune's best checkpoint only when it beat the inherited weights.
    best, n_val = summary["best"], summary["val_images"]
    import torch

    from vitnas.models.spec import load_model
    from vitnas.report import top1_standard_error

    x = torch.randn(2, 3, 16, 16)
    if best["exported_weights"].startswith("fine-tuned"):
        ft_meta = json.loads((run / "export" / "config.json").read_text())["finetune"]["best"]
        assert ft_meta["value"] > best["val_top1_inherited"]
        want, _ = load_model(run / "finetune" / "best.safetensors")
    else:
        assert best["exported_weights"].startswith("inherited")
        supernet, _ = load_model(run / "supernet" / "last.safetensors")
        want = supernet.extract(vitnas_arch(run)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), want(x), atol=0, rtol=0)
    # Noise is reported: the standard error on the validation images, and the supernet's test top-1.
    evo = summary["strategies"]["evolution"]
    assert evo["best_top1_standard_error"] == pytest.approx(top1_standard_error(evo["best_top1"], n_val))
    assert n_val == 200 and set(summary["supernet_test_top1"]) == {"largest", "smallest"}
    assert "+- s.e." in out and "one image is 0.50 points" in out and "exported weights:" in out
    # ... and so is whether the scores rank archs at all (the two validation halves' agreement), with every
    # candidate's halves recorded; the verdict compares the two best archs image by image where they differ.
    assert summary["split_half"]["candidates"] == 12 and -1 <= summary["split_half"]["tau"] <= 1
    assert "ranking signal: the two validation halves rank 12 random candidates" in out
    assert all(len(r["val_halves"]) == 2 for r in summary_rows(tmp_path))
    paired = summary["paired"]
    if paired is not None:
        assert paired["main_only"] + paired["random_only"] <= n_val and 0 <= paired["p_value"] <= 1
    # A rerun continues: training and search are complete, nothing is recomputed.
    from vitnas.search.evaluator import SupernetEvaluator
    from vitnas.train import Trainer

    calls = {"evaluate": 0, "fit": 0}

    def count(name):
        def inner(*args, **kwargs):
            calls[name] += 1
            raise AssertionError(f"{name} ran again on a finished run")

        return inner

    monkeypatch.setattr(SupernetEvaluator, "__call__", count("evaluate"))
    monkeypatch.setattr(Trainer, "fit", count("fit"))
    ckpts = ["supernet/last.safetensors", "finetune/last.safetensors"]  # not even rewritten
    before = {f: (run / f).stat().st_mtime_ns for f in ckpts}
    lines = (run / "search/evolution/candidates.jsonl").read_text()
    again = run_pipeline(PipelineConfig.from_yaml(path))
    assert calls == {"evaluate": 0, "fit": 0}
    assert {f: (run / f).stat().st_mtime_ns for f in ckpts} == before
    assert (run / "search/evolution/candidates.jsonl").read_text() == lines
    assert again["best"]["arch"] == summary["best"]["arch"]
    assert again["strategies"] == summary["strategies"]


def vitnas_arch(run):
    from vitnas import ArchConfig

    return ArchConfig.from_yaml(run / "export" / "arch.yaml")


def test_choose_weights_exports_a_fine_tune_only_when_it_beats_the_inherited_weights():
    from vitnas.pipeline import choose_weights

    assert choose_weights(74.0, {"value": 70.5, "epoch": 3, "step": 30}) == (
        False,
        "inherited from the supernet (val 74.00%; the fine-tune peaked at 70.50%)",
    )
    assert choose_weights(74.0, {"value": 74.0, "epoch": 1, "step": 10})[0] is False  # a tie keeps inheritance
    use, why = choose_weights(74.0, {"value": 76.5, "epoch": 2, "step": 20})
    assert use and why == "fine-tuned, best epoch 2 (val 76.50% > 74.00% inherited)"
    assert choose_weights(74.0, None)[0] is False


def test_standard_error_of_top1():
    from vitnas.report import top1_standard_error

    assert top1_standard_error(50.0, 100) == pytest.approx(5.0)  # sqrt(.5 * .5 / 100) = 5 points
    assert top1_standard_error(90.0, 200) == pytest.approx(100 * (0.9 * 0.1 / 200) ** 0.5)
    assert top1_standard_error(100.0, 50) == 0.0


def test_pipeline_config_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("search: {population: 4}\nfine_tune: 3\n")
    with pytest.raises(ValueError, match="unknown key 'fine_tune'"):
        PipelineConfig.from_yaml(path)
    cfg = PipelineConfig(
        out_dir=str(tmp_path / "x"), train=QUICK["train"], search={"constraints": {"params": [None, 1000]}}
    )
    with pytest.raises(ValueError, match="no arch in space 'digits' can meet params"):
        run_pipeline(cfg)


def test_latency_table_predicts_and_caches(tmp_path, monkeypatch):
    space = SearchSpace.preset("digits")
    net = ViTSupernet(space, num_classes=10)
    table = LatencyTable.build(space, net.model_kwargs, cache_dir=tmp_path, reps=3, warmup=1)
    assert len(table.entries) == 3 * 3 * 3 + 3
    rng = np.random.default_rng(0)
    arch = space.sample(rng)
    assert table.predict(arch) > 0
    # a prediction is the stem's entry plus one block entry per layer (no timing is compared: this VM drifts)
    largest = space.largest()
    blocks = [table.entries[table._block_key(largest.embed_dim, h, d)] for h, d in zip(largest.num_heads,
              largest.hidden_dims(), strict=True)]  # fmt: skip
    assert table.predict(largest) == pytest.approx(table.entries[f"stem/{largest.embed_dim}"] + sum(blocks))
    again = LatencyTable.build(space, net.model_kwargs, cache_dir=tmp_path)
    assert again.entries == table.entries  # read from the cache, not measured again
    archs = [space.sample(rng) for _ in range(3)]
    monkeypatch.setattr("vitnas.costs.latency.measure_latency", lambda model, x, reps=10: 0.5)  # "measured"
    report = table.error_report(net, archs, reps=3)
    errors = [abs(table.predict(a) - 0.5) / 0.5 for a in archs]
    assert report["n"] == 3
    assert report["mean_abs_rel_error"] == pytest.approx(sum(errors) / 3)
    assert report["max_abs_rel_error"] == pytest.approx(max(errors))
