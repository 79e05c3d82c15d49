"""The pipeline's stages, each reading the previous stage's artefact and writing its own under out_dir:
supernet (train or load), search (under constraints, with a random baseline), finetune, export."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitnas.checkpoint import read_metadata
from vitnas.costs.latency import LatencyTable
from vitnas.data import AugmentConfig, ImageData, load_data_of
from vitnas.evaluation import calibration_batches, correct_per_image, evaluate, recalibrated_batchnorm
from vitnas.models.spec import is_supernet, load_model
from vitnas.pipeline.config import PipelineConfig
from vitnas.precision import amp_dtype
from vitnas.report import plot_candidates, plot_progress
from vitnas.search import Constraints, Halving, SearchConfig, Workers, build_strategy, pareto_front, run_search
from vitnas.search.evaluator import SplitHalves, SupernetEvaluator
from vitnas.space.arch import ArchConfig
from vitnas.train import StepInfo, TrainConfig, Trainer
from vitnas.train.config import SUPERNET_TASKS

__all__ = [
    "Progress",
    "Run",
    "finetune_stage",
    "paired_comparison",
    "search_stage",
    "split_half_tau",
    "supernet_stage",
]

log = logging.getLogger(__name__)

GRADIENT_STRATEGIES = ("darts", "cdarts")  # strategies whose search is a training task of the same name

# progress(stage, done, total, info): one bar per stage name; `info` holds e.g. epoch and loss.
Progress = Callable[[str, int, int, dict[str, Any]], None]


@dataclass
class Run:
    """What the stages hand on to each other."""

    cfg: PipelineConfig
    out: Path
    device: torch.device
    progress: Progress | None
    resume: bool
    search: SearchConfig
    constraints: Constraints
    workers: Workers = field(default_factory=Workers)  # the ranks under torchrun (search is sharded over them)
    timings: dict[str, float] = field(default_factory=dict)
    # supernet stage
    ckpt: Path | None = None
    supernet: nn.Module | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    data: ImageData | None = None
    norm: AugmentConfig | None = None
    # search stage
    costs: dict[str, Callable[[ArchConfig], float]] = field(default_factory=dict)
    lut: LatencyTable | None = None
    ranges: dict[str, Any] = field(default_factory=dict)
    calibration: list[torch.Tensor] | None = None  # training batches re-estimating BatchNorm statistics per path
    results: dict[str, Any] = field(default_factory=dict)
    fronts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # the main search's, by cost
    plots: list[Path] = field(default_factory=list)

    def step_progress(self, stage: str) -> Callable[[StepInfo], None] | None:
        """A trainer progress callback reporting under `stage`."""
        if self.progress is None:
            return None
        report = self.progress
        return lambda info: report(stage, info.step, info.total, {"epoch": info.epoch, "loss": info.loss})


def train_or_continue(trainer: Trainer) -> None:
    """Fit, or when out_dir holds this run's finished checkpoint, load it (refusing other settings)."""
    if trainer.is_finished():
        trainer.load(trainer.ckpt_path)
    else:
        trainer.fit()


def supernet_stage(run: Run) -> None:
    """Train the supernet (resuming) or load the given one; its data split comes with it."""
    t = time.perf_counter()
    cfg = run.cfg
    run.ckpt = Path(cfg.checkpoint) if cfg.checkpoint else run.out / "supernet" / "last.safetensors"
    data = None
    if not cfg.checkpoint:
        # gradient-based strategies are their training task (the search is the training)
        task = run.search.strategy if run.search.strategy in GRADIENT_STRATEGIES else "supernet"
        train_cfg = TrainConfig.from_dict(
            {"task": task, **cfg.train, "out_dir": str(run.out / "supernet")}, source=f"{cfg.source}: train"
        )
        if run.search.strategy in GRADIENT_STRATEGIES and train_cfg.task != run.search.strategy:
            raise ValueError(
                f"{cfg.source}: search.strategy {run.search.strategy!r} derives its genotype while training: "
                f"train.task must be {run.search.strategy!r} (or unset), got {train_cfg.task!r}"
            )
        if train_cfg.task not in SUPERNET_TASKS:
            raise ValueError(
                f"{cfg.source}: train.task={train_cfg.task!r}; the pipeline trains a supernet: one of {SUPERNET_TASKS}"
            )
        trainer = Trainer(train_cfg, resume=True, progress=run.step_progress("train supernet"), device=run.device)
        train_or_continue(trainer)
        data = trainer.data
    if not is_supernet(read_metadata(run.ckpt)["model"]["kind"]):
        raise ValueError(f"{run.ckpt}: checkpoint must hold a supernet, this one holds a single model")
    supernet, run.meta = load_model(run.ckpt)
    run.supernet = supernet.to(run.device)
    run.data = data or load_data_of(run.meta, source=str(run.ckpt))
    run.norm = AugmentConfig.from_dict(run.meta["norm"])
    run.timings["supernet"] = time.perf_counter() - t


def _costs(run: Run) -> None:
    supernet, scfg = run.supernet, run.search
    run.costs = {"params": supernet.num_params, "macs": supernet.num_macs}
    if "latency_ms" in run.constraints.windows or scfg.cost == "latency_ms":
        lut = None
        if run.workers.is_main:  # measured once; every rank must search with the same table
            lut = LatencyTable.build(supernet.space, supernet.vit_config, batch=scfg.latency_batch, device=run.device)
        run.lut = _from_main(run, lut)
        run.costs["latency_ms"] = run.lut.predict
    run.ranges = run.constraints.check_feasible(supernet.space, run.costs)


def _from_main(run: Run, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a measured table), or `obj` itself in one process."""
    if run.workers.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def search_stage(run: Run) -> None:
    """Costs and constraints, then the search and (at equal budget) the random baseline; plots."""
    t = time.perf_counter()
    _costs(run)
    scfg, space, tcfg = run.search, run.supernet.space, run.meta["config"]
    run.calibration = calibration_batches(
        run.data.train,
        scfg.bn_calibration,
        img_size=run.meta["img_size"],
        norm=run.norm,
        device=run.device,
        model=run.supernet,
    )
    evaluator = SupernetEvaluator(
        run.supernet,
        run.data.val,
        img_size=run.meta["img_size"],
        norm=run.norm,
        batch_size=scfg.batch_size,
        device=run.device,
        bilateral=bool(tcfg.get("bilateral", False)) or getattr(space, "bilateral", False),
        amp_dtype=amp_dtype(scfg.amp, run.device),
        calibration=run.calibration,
    )
    halving, seed = None, tcfg.get("seed", 0)
    if scfg.halving:
        screen, finish = evaluator.parts(scfg.halving, seed=seed)
        halving = Halving(_memoized(screen), _memoized(finish), len(screen), len(finish), scfg.halving_keep)
    elif len(run.data.val) >= 2 * run.data.num_classes:  # scored by halves: the same cost, plus their agreement
        evaluator = SplitHalves(evaluator, seed=seed)
    evaluate_once = _memoized(evaluator)  # the baseline reuses scores of archs the main search evaluated

    def feasible(arch: ArchConfig) -> bool:
        return run.constraints.satisfied({name: run.costs[name](arch) for name in run.constraints.windows})

    identity = {**scfg.to_dict(), "supernet": str(run.ckpt), "supernet_step": run.meta["step"]}
    names = [scfg.strategy] + (["random"] if run.cfg.baseline and scfg.strategy != "random" else [])
    for name in names:
        initial = _initial_archs(run) if name == scfg.strategy else ()
        kwargs = {**scfg.strategy_kwargs(), "initial": initial}
        strategy = build_strategy(name, space, feasible=feasible, cost=run.costs[scfg.cost], **kwargs)
        run.results[name] = run_search(
            strategy,
            evaluate_once,
            costs=run.costs,
            constraints=run.constraints,
            out_dir=run.out / "search" / name,
            cost=scfg.cost,
            resume=run.resume,
            progress=_search_progress(run, f"search ({name})"),
            config=identity,
            workers=run.workers,
            halving=halving,
        )
    run.timings["search"] = time.perf_counter() - t
    if run.results[scfg.strategy].best is None:
        raise RuntimeError("the search evaluated no candidate")
    main = run.results[scfg.strategy]
    run.fronts = {c: pareto_front(main.candidates, c) for c in ("params", "macs")}
    if run.workers.is_main:
        _plots(run)


def _initial_archs(run: Run) -> list[Any]:
    """The archs the main strategy starts from: a Cream board's paths (strategy board, or from_board), the
    genotype a DARTS / CDARTS training derived (strategies darts / cdarts), else none."""
    name = run.search.strategy
    if name in GRADIENT_STRATEGIES:
        saved = run.meta.get("darts", {}).get("genotype")
        if not saved or run.meta.get("task") != name:
            raise ValueError(f"{run.ckpt}: strategy {name!r} needs a supernet trained with task {name!r}")
        return [run.supernet.space.arch_from_dict({"genotype": saved}, source=str(run.ckpt))]
    return _board_archs(run) if name == "board" or run.search.from_board else []


def _board_archs(run: Run) -> list[Any]:
    """The prioritized paths of a Cream-trained supernet, best first."""
    board = run.meta.get("cream", {}).get("board")
    if not board:
        raise ValueError(
            f"{run.ckpt}: holds no Cream board (search.strategy board / from_board need a supernet trained with "
            f"task cream)"
        )
    return [run.supernet.space.arch_from_dict(e["arch"], source=f"{run.ckpt} board") for e in board]


def _memoized(evaluate: Callable[[ArchConfig], dict[str, float]]) -> Callable[[ArchConfig], dict[str, float]]:
    memo: dict[str, dict[str, float]] = {}

    def evaluate_once(arch: ArchConfig) -> dict[str, float]:
        if arch.key() not in memo:
            memo[arch.key()] = evaluate(arch)
        return memo[arch.key()]

    return evaluate_once


def _search_progress(run: Run, stage: str) -> Callable[[int, int, dict], None] | None:
    if run.progress is None:
        return None
    report, population = run.progress, run.search.population
    budget = population * run.search.generations
    return lambda gen, i, row: report(stage, gen * population + i + 1, budget, {})


def _plots(run: Run) -> None:
    main, fronts = run.results[run.search.strategy], run.fronts
    title = f"{run.search.strategy} search on {run.data.name}: validation top-1 vs cost"
    run.plots = [
        plot_candidates(main.candidates, fronts, run.out / "candidates.png", title=title),
        plot_progress(
            {n: r.best_per_generation for n, r in run.results.items()},
            run.out / "progress.png",
            title="best candidate so far",
            val_images=len(run.data.val),
        ),
    ]


def finetune_stage(run: Run, arch_path: Path) -> Trainer:
    """Fine-tune the winner from its inherited weights on the supernet's data split and settings."""
    t = time.perf_counter()
    cfg = run.cfg
    base = {k: v for k, v in run.meta["config"].items() if k not in ("task", "out_dir", "arch", "init_from")}
    ft_cfg = TrainConfig.from_dict(
        {
            **base,
            "epochs": cfg.finetune_epochs,
            "warmup_epochs": 0.0,
            **cfg.finetune,
            "task": "subnet",
            "arch": str(arch_path),
            "init_from": str(run.ckpt),
            "out_dir": str(run.out / "finetune"),
        },
        source=f"{cfg.source}: finetune",
    )
    ft = Trainer(ft_cfg, data=run.data, resume=True, progress=run.step_progress("fine-tune"), device=run.device)
    train_or_continue(ft)
    run.timings["finetune"] = time.perf_counter() - t
    return ft


def latency_report(run: Run) -> dict[str, Any] | None:
    """How well the latency table predicted measured latency, on a few sampled archs."""
    if run.lut is None or run.cfg.latency_check <= 0:
        return None
    rng = np.random.default_rng(0)
    space = run.supernet.space
    archs = [space.sample(rng) for _ in range(run.cfg.latency_check)]
    return run.lut.error_report(run.supernet, archs, batch=run.search.latency_batch, device=run.device)


def paired_comparison(run: Run) -> dict[str, Any] | None:
    """The main search's best arch against random search's on the same validation images: how many images
    only one of them gets right, and McNemar's exact two-sided p-value (a paired test, far more sensitive
    than comparing two accuracies' standard errors). None without a baseline, when both are one arch, or
    for a bilateral (ViTAS) supernet, whose scores average two slicings."""
    main, rnd = run.results.get(run.search.strategy), run.results.get("random")
    if main is None or rnd is None or main is rnd or not main.best or not rnd.best:
        return None
    if run.meta["config"].get("bilateral") or getattr(run.supernet.space, "bilateral", False):
        return None
    if main.best["key"] == rnd.best["key"]:
        return None
    from scipy.stats import binomtest

    amp = amp_dtype(run.search.amp, run.device)
    kw = dict(img_size=run.meta["img_size"], norm=run.norm, device=run.device, amp_dtype=amp)
    ok = []
    for r in (main, rnd):
        arch = run.supernet.space.arch_from_dict(r.best["arch"], source="search result")
        with run.supernet.active(arch), recalibrated_batchnorm(run.supernet, run.calibration):
            ok.append(correct_per_image(run.supernet, run.data.val, **kw))
    b, c = int((ok[0] & ~ok[1]).sum()), int((~ok[0] & ok[1]).sum())
    p = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    return {"main_only": b, "random_only": c, "p_value": float(p)}


def split_half_tau(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Kendall tau between the two validation halves' top-1 over candidates scored by halves: how
    reliably the supernet's scores rank these archs (near 0: the ranking is noise). None for < 5 rows."""
    halves = [r["val_halves"] for r in rows if "val_halves" in r]
    if len(halves) < 5:
        return None
    from scipy.stats import kendalltau

    res = kendalltau([h[0] for h in halves], [h[1] for h in halves])
    tau = 0.0 if np.isnan(res.statistic) else float(res.statistic)
    return {"tau": tau, "p_value": float(1.0 if np.isnan(res.pvalue) else res.pvalue), "candidates": len(halves)}


def supernet_test_top1(run: Run) -> dict[str, float]:
    """Test top-1 of the supernet's largest and smallest subnets (reported only; nothing ranks on it)."""
    space = run.supernet.space
    out = {}
    for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
        with run.supernet.active(arch), recalibrated_batchnorm(run.supernet, run.calibration):
            r = evaluate(run.supernet, run.data.test, img_size=run.meta["img_size"], norm=run.norm, device=run.device)
        out[name] = r["top1"]
    return out
