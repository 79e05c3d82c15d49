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

from vitnas._config import check_fields
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

    source: str = field(default="pipeline config", repr=False, compare=False)  # names errors

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with keys such as out_dir, train, search")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
        for key in data:
            if key not in names:
                raise ValueError(f"{path}: unknown key {key!r}; expected one of {names}")
        obj = cls(**data, source=str(path))
        check_fields(obj, str(path))
        return obj


def run_pipeline(
    cfg: PipelineConfig,
    *,
    device: str | torch.device | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    train_progress: Callable | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    import os

    from vitnas.costs.latency import LatencyTable, measure_latency
    from vitnas.data import AugmentConfig, load_data
    from vitnas.evaluation import evaluate
    from vitnas.export import export_subnet
    from vitnas.report import plot_candidates, plot_progress
    from vitnas.search import Constraints, SearchConfig, build_strategy, pareto_front, run_search
    from vitnas.search.evaluator import SupernetEvaluator
    from vitnas.train import TrainConfig, Trainer, load_model
    from vitnas.train.checkpoint import read_metadata

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "vitnas search runs as one process; train the supernet with torchrun "
            "(vitnas train-supernet) and pass it here with --checkpoint"
        )
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = cfg.source
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timings: dict[str, float] = {}
    scfg = SearchConfig.from_dict(cfg.search, source=f"{src}: search")
    constraints = Constraints.from_dict(scfg.constraints)
    if not resume:  # start over, keeping the old checkpoints aside rather than deleting them
        for stage in ("supernet", "finetune"):
            old = out / stage / "last.safetensors"
            if old.is_file():
                old.replace(old.with_suffix(".safetensors.old"))
                log.warning("moved %s aside to %s", old, old.with_suffix(".safetensors.old"))

    # 1. supernet
    t = time.perf_counter()
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else out / "supernet" / "last.safetensors"
    if not cfg.checkpoint:
        train_cfg = TrainConfig.from_dict(
            {**cfg.train, "task": "supernet", "out_dir": str(out / "supernet")}, source=f"{src}: train"
        )
        trainer = Trainer(train_cfg, resume=True, progress=train_progress, device=device)
        done = trainer.ckpt_path.is_file() and read_metadata(trainer.ckpt_path)["step"] >= trainer.total_steps
        if done:
            trainer.load(trainer.ckpt_path)  # refuses a checkpoint trained with other settings
        else:
            trainer.fit()
        data = trainer.data
    if read_metadata(ckpt)["model"]["kind"] != "supernet":
        raise ValueError(f"{ckpt}: checkpoint must hold a supernet, this one holds a single model")
    supernet, meta = load_model(ckpt)
    supernet = supernet.to(device)
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
        lut = LatencyTable.build(space, supernet.model_kwargs, batch=scfg.latency_batch, device=device)
        costs["latency_ms"] = lut.predict
    ranges = constraints.check_feasible(space, costs)

    def feasible(arch: ArchConfig) -> bool:
        return constraints.satisfied({name: costs[name](arch) for name in constraints.windows})

    # 3. search (and the random baseline at equal budget)
    t = time.perf_counter()
    evaluator = SupernetEvaluator(
        supernet,
        data.val,
        img_size=img_size,
        norm=norm,
        batch_size=scfg.batch_size,
        device=device,
        bilateral=bool(tcfg.get("bilateral", False)) or space.bilateral,
    )
    memo: dict[str, dict[str, float]] = {}  # the baseline reuses scores of archs the main search evaluated

    def evaluate_once(arch: ArchConfig) -> dict[str, float]:
        if arch.key() not in memo:
            memo[arch.key()] = evaluator(arch)
        return memo[arch.key()]

    identity = {**scfg.to_dict(), "supernet": str(ckpt), "supernet_step": meta["step"]}
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
            evaluate_once,
            costs=costs,
            constraints=constraints,
            out_dir=out / "search" / name,
            cost=scfg.cost,
            resume=resume,
            progress=step,
            config=identity,
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
        # The fine-tune shares the supernet's data split (checked by the trainer) and settings.
        base = {k: v for k, v in tcfg.items() if k not in ("task", "out_dir", "arch", "init_from")}
        ft_cfg = TrainConfig.from_dict(
            {
                **base,
                "epochs": cfg.finetune_epochs,
                "warmup_epochs": 0.0,
                **cfg.finetune,
                "task": "subnet",
                "arch": str(arch_path),
                "init_from": str(ckpt),
                "out_dir": str(out / "finetune"),
            },
            source=f"{src}: finetune",
        )
        ft = Trainer(ft_cfg, data=data, resume=True, progress=train_progress, device=device)
        if not (ft.ckpt_path.is_file() and read_metadata(ft.ckpt_path)["step"] >= ft.total_steps):
            ft.fit()
        else:
            ft.load(ft.ckpt_path)
        model = ft.model.eval()
        norm, img_size = ft.aug_cfg, ft.img_size
        finetune_top1 = ft.history[-1]["val_top1"] if ft.history else None
        record["finetune"] = {"epochs": cfg.finetune_epochs, "val_top1": finetune_top1}
        timings["finetune"] = time.perf_counter() - t
    model = model.eval().to(device)
    test = evaluate(model, data.test, img_size=img_size, norm=norm, device=device)  # reported, never ranked on
    record["test_top1"] = test["top1"]
    h, w = model.config["img_size"]
    latency = {b: measure_latency(model, torch.randn(b, 3, h, w, device=device)) for b in {1, scfg.latency_batch}}
    export_dir = export_subnet(model.cpu(), out / "export", extra=record, onnx=cfg.onnx)
    lut_report = None
    if lut is not None and cfg.latency_check > 0:
        import numpy as np

        rng = np.random.default_rng(0)
        lut_report = lut.error_report(
            supernet, [space.sample(rng) for _ in range(cfg.latency_check)], batch=scfg.latency_batch, device=device
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
            "latency_ms": latency[scfg.latency_batch],
            "latency_ms_by_batch": latency,
            "latency_device": str(device),
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
