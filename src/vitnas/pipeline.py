"""The main job, from one YAML: train the supernet (or load one), search under constraints, export the
winner, optionally fine-tune it, and report. Every stage writes its artefact into `out_dir`, and a
rerun continues where the last one stopped (training resumes, the search resumes per generation)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitnas._io import atomic_write_text
from vitnas.space.arch import ArchConfig
from vitnas.space.yaml_io import load_yaml

__all__ = ["PipelineConfig", "run_pipeline"]

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    out_dir: str = "runs/search"
    checkpoint: str | None = None  # a trained supernet checkpoint; null = train one from `train`
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (task is supernet)
    search: dict[str, Any] = field(default_factory=dict)  # SearchConfig fields
    baseline: bool = True  # also run random search at the same budget, for the comparison plot
    onnx: bool = False  # also export ONNX, checked against onnxruntime
    finetune_epochs: int = 0  # fine-tune the winner with inherited weights; 0 = skip
    finetune: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for the fine-tune
    latency_check: int = 8  # archs on which the latency table's prediction error is measured

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        data = load_yaml(path) or {}
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ValueError(f"{path}: unknown key {key!r}; expected one of {names}")
        return cls(**data)


def run_pipeline(
    cfg: PipelineConfig,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    train_progress: Callable | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    from vitnas.costs.latency import LatencyTable, measure_latency
    from vitnas.data import AugmentConfig, load_data
    from vitnas.evaluation import evaluate
    from vitnas.export import export_subnet
    from vitnas.report import plot_candidates, plot_progress
    from vitnas.search import Constraints, SearchConfig, build_strategy, pareto_front, run_search
    from vitnas.search.evaluator import SupernetEvaluator
    from vitnas.train import TrainConfig, Trainer, load_model

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    scfg = SearchConfig.from_dict(cfg.search, source=f"{cfg.out_dir}: search")
    constraints = Constraints.from_dict(scfg.constraints)

    # 1. supernet
    t = time.perf_counter()
    train_cfg = TrainConfig.from_dict(
        {**cfg.train, "task": "supernet", "out_dir": str(out / "supernet")}, source="train"
    )
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else out / "supernet" / "last.safetensors"
    if not cfg.checkpoint:
        trainer = Trainer(train_cfg, resume=resume, progress=train_progress)
        done = trainer.ckpt_path.is_file() and json.loads(_meta(trainer.ckpt_path))["step"] >= trainer.total_steps
        if not done:
            trainer.fit()
        data = trainer.data
    supernet, meta = load_model(ckpt)
    tcfg = meta["config"]
    if cfg.checkpoint:
        data = load_data(
            tcfg["data_path"], img_size=meta["img_size"], val_per_class=tcfg["val_per_class"], seed=tcfg["seed"]
        )
    timings["supernet"] = time.perf_counter() - t
    space = supernet.space
    img_size = meta["img_size"]
    norm = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["norm"].items()})
    history = meta.get("history") or [{}]

    # 2. costs and constraints
    costs: dict[str, Callable[[ArchConfig], float]] = {"params": supernet.num_params, "macs": supernet.num_macs}
    lut = None
    if "latency_ms" in constraints.windows or scfg.cost == "latency_ms":
        lut = LatencyTable.build(space, supernet.model_kwargs, batch=scfg.latency_batch)
        costs["latency_ms"] = lut.predict
    ranges = constraints.check_feasible(space, costs)

    def feasible(arch: ArchConfig) -> bool:
        return constraints.satisfied({name: costs[name](arch) for name in constraints.windows})

    # 3. search (and the random baseline at equal budget)
    t = time.perf_counter()
    evaluator = SupernetEvaluator(supernet, data.val, img_size=img_size, norm=norm, batch_size=scfg.batch_size)
    strategies = [scfg.strategy] + (["random"] if cfg.baseline and scfg.strategy != "random" else [])
    results = {}
    budget = scfg.population * scfg.generations
    for name in strategies:
        strategy = build_strategy(name, space, feasible=feasible, cost=costs[scfg.cost], **scfg.strategy_kwargs())

        def step(gen: int, i: int, row: dict, _name: str = name) -> None:
            if progress:
                progress(f"search ({_name})", gen * scfg.population + i + 1, budget)

        results[name] = run_search(
            strategy,
            evaluator,
            costs=costs,
            constraints=constraints,
            out_dir=out / "search" / name,
            cost=scfg.cost,
            resume=resume,
            progress=step,
            config=scfg.to_dict(),
        )
    timings["search"] = time.perf_counter() - t
    main = results[scfg.strategy]
    if main.best is None:
        raise RuntimeError("the search evaluated no candidate")
    fronts = {c: pareto_front(main.candidates, c) for c in ("params", "macs")}
    plots = [
        plot_candidates(
            main.candidates,
            fronts,
            out / "candidates.png",
            title=f"{scfg.strategy} search on {data.name}: validation top-1 vs cost",
        )
    ]
    plots.append(
        plot_progress(
            {n: r.best_per_generation for n, r in results.items()}, out / "progress.png", title="best candidate so far"
        )
    )

    # 4. export the winner (inherited weights), then optionally fine-tune it
    best_arch = ArchConfig.from_dict(main.best["arch"])
    model = supernet.extract(best_arch)
    record: dict[str, Any] = {
        "arch": best_arch.to_dict(),
        "search": {k: main.best[k] for k in ("top1", "loss")},
        "supernet_checkpoint": str(ckpt),
        "classes": data.classes,
        "norm": norm.to_dict(),
    }
    finetune_top1 = None
    if cfg.finetune_epochs > 0:
        t = time.perf_counter()
        arch_path = out / "search" / scfg.strategy / "best.yaml"
        ft_cfg = TrainConfig.from_dict(
            {
                **cfg.train,
                "epochs": cfg.finetune_epochs,
                "warmup_epochs": 0.0,
                **cfg.finetune,
                "task": "subnet",
                "arch": str(arch_path),
                "init_from": str(ckpt),
                "out_dir": str(out / "finetune"),
            },
            source="finetune",
        )
        ft = Trainer(ft_cfg, data=data, resume=resume, progress=train_progress)
        ft.fit()
        model = ft.model.eval()
        finetune_top1 = ft.history[-1]["val_top1"] if ft.history else None
        record["finetune"] = {"epochs": cfg.finetune_epochs, "val_top1": finetune_top1}
        timings["finetune"] = time.perf_counter() - t
    model = model.eval()
    test = evaluate(model, data.test, img_size=img_size, norm=norm)
    record["test_top1"] = test["top1"]
    h, w = model.config["img_size"]
    latency = measure_latency(model, torch.randn(scfg.latency_batch, 3, h, w))
    export_dir = export_subnet(model, out / "export", extra=record, onnx=cfg.onnx)
    lut_report = None
    if lut is not None and cfg.latency_check > 0:
        import numpy as np

        rng = np.random.default_rng(0)
        lut_report = lut.error_report(
            supernet, [space.sample(rng) for _ in range(cfg.latency_check)], batch=scfg.latency_batch
        )
    summary = {
        "data": data.summary(),
        "space": space.name,
        "space_size": space.size(),
        "supernet_checkpoint": str(ckpt),
        "supernet_val_top1": {k: v for k, v in history[-1].items() if k.startswith("val_top1")},
        "constraints": constraints.to_dict(),
        "feasible_ranges": ranges,
        "strategies": {
            n: {
                "evaluations": len(r.candidates),
                "best_top1": r.best["top1"] if r.best else None,
                "best_per_generation": r.best_per_generation,
            }
            for n, r in results.items()
        },
        "best": {
            "arch": best_arch.key(),
            "params": supernet.num_params(best_arch),
            "macs": supernet.num_macs(best_arch),
            "latency_ms": latency,
            "val_top1_inherited": main.best["top1"],
            "val_top1_finetuned": finetune_top1,
            "test_top1": test["top1"],
        },
        "pareto_front": [
            {"arch": r["key"], "top1": r["top1"], "params": r["params"], "macs": r["macs"]} for r in fronts["params"]
        ],
        "latency_table": lut_report,
        "export": str(export_dir),
        "plots": [str(p) for p in plots],
        "seconds": timings,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


def _meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["vitnas"]
