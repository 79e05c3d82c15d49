"""`vitnas search-space`: iterations of (train or fine-tune a supernet on the current space, measure its E-T
error with inherited weights, move the ranges: `vitnas.search.space_search`). Every iteration lives in its
own folder (`iter_0/`, ...: the space YAML, the supernet run, the scored samples, `result.json`), so a run
killed anywhere continues where it stopped: finished iterations are read back, training resumes from its
checkpoint, scoring from the last sample written. The final space's YAML feeds `vitnas search` unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitnas._config import check_fields, check_range
from vitnas._io import atomic_write_text
from vitnas.data import AugmentConfig, load_data_of
from vitnas.evaluation import calibration_batches
from vitnas.models.spec import load_model
from vitnas.report import plot_space_search
from vitnas.search import Constraints
from vitnas.search.evaluator import SupernetEvaluator
from vitnas.search.run import load_candidates
from vitnas.search.space_search import et_error, grid_around, shift_ranges
from vitnas.space import load_space
from vitnas.space.yaml_io import load_yaml
from vitnas.train import TrainConfig, Trainer

__all__ = ["SpaceSearchConfig", "run_space_search"]

log = logging.getLogger(__name__)

# progress(stage, done, total): stage is "train i" or "score i"
Progress = Callable[[str, int, int], None]


@dataclass
class SpaceSearchConfig:
    out_dir: str = "runs/space_search"  # iteration folders, plots and final_space.yaml go here
    space: str = "s3-cifar"  # the initial space: a preset or a space YAML (a kind with ranges: S3)
    dims: list[str] = field(default_factory=list)  # dimensions to search (empty: every dimension the space has)
    grids: dict[str, list[float]] = field(default_factory=dict)  # a dimension's allowed values (default: around it)
    grid_extend: int = 2  # default grids: the initial choices' spacing continued this many steps both ways
    iterations: int = 3  # spaces measured; the ranges move between them
    epochs: int = 4  # supernet training epochs on the initial space
    finetune_epochs: int = 2  # epochs on each later space, starting from the previous supernet's weights
    samples: int = 100  # architectures drawn per space for E (and the regression)
    top_k: int = 10  # the top tier: T is the mean error of the best top_k samples
    min_t: float = 2.0  # a dimension moves when its slope's t statistic reaches this
    constraints: dict[str, Any] = field(default_factory=dict)  # samples kept inside, e.g. {macs: [null, 5.0e6]}
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (data_path, batch_size, lr, ...)
    seed: int = 0  # the samples drawn per iteration (training has train.seed)

    def __post_init__(self) -> None:
        check_fields(self, "search-space config")
        for name in ("iterations", "epochs", "samples", "top_k", "finetune_epochs"):
            check_range("search-space config", name, getattr(self, name), 1)
        check_range("search-space config", "min_t", self.min_t, 0.0)
        check_range("search-space config", "grid_extend", self.grid_extend, 0)
        Constraints.from_dict(self.constraints, source="search-space config")
        for key in ("task", "space", "epochs", "out_dir", "pretrained"):
            if key in self.train:
                raise ValueError(f"search-space config: train.{key} is set by the space search; remove it")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> SpaceSearchConfig:
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of search-space settings")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ValueError(f"{path}: unknown key {key!r}; expected one of {names}")
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


def _grids(cfg: SpaceSearchConfig, ranges: dict[str, tuple]) -> dict[str, tuple]:
    out = {}
    for name, choices in ranges.items():
        if name in cfg.grids:
            out[name] = tuple(sorted(cfg.grids[name]))
        else:
            integer = all(float(v).is_integer() for v in choices)
            out[name] = grid_around(choices, cfg.grid_extend, integer=integer)
    unknown = sorted(set(cfg.grids) - set(ranges))
    if unknown:
        raise ValueError(f"search-space config: grids for unknown dimensions {unknown}; the space has {list(ranges)}")
    return out


def _train(cfg: SpaceSearchConfig, it: int, space_yaml: Path, folder: Path, progress: Progress | None) -> Path:
    """Train (iteration 0) or fine-tune (later: from the previous supernet) on this iteration's space."""
    prev = folder.parent / f"iter_{it - 1}" / "supernet" / "last.safetensors"
    tcfg = TrainConfig.from_dict(
        {
            **cfg.train,
            "task": "supernet",
            "space": str(space_yaml),
            "epochs": cfg.epochs if it == 0 else cfg.finetune_epochs,
            "out_dir": str(folder / "supernet"),
            "pretrained": str(prev) if it > 0 else None,
        },
        source=f"search-space iteration {it}",
    )
    done = folder / "supernet" / "trained.json"  # written once the supernet is finished: nothing to resume
    if done.is_file():
        return folder / "supernet" / "last.safetensors"
    trainer = Trainer(
        tcfg, resume=True, progress=(lambda i: progress(f"train {it}", i.step, i.total)) if progress else None
    )
    if not trainer.is_finished():
        trainer.fit()
    atomic_write_text(done, json.dumps({"step": trainer.step, "space": str(space_yaml)}))
    return trainer.ckpt_path


def _score(cfg: SpaceSearchConfig, it: int, ckpt: Path, folder: Path, progress: Progress | None) -> list[dict]:
    """`samples` seeded feasible archs of the space, scored with inherited weights; rows append to
    samples.jsonl as they are scored, so a rerun scores only the rest."""
    supernet, meta = load_model(ckpt)
    data = load_data_of(meta, source=str(ckpt))
    norm = AugmentConfig.from_dict(meta["norm"])
    img = meta["img_size"]
    calib = calibration_batches(data.train, 256, img_size=img, norm=norm, model=supernet)
    evaluator = SupernetEvaluator(supernet, data.val, img_size=img, norm=norm, calibration=calib)
    constraints = Constraints.from_dict(cfg.constraints)
    costs = {"params": supernet.num_params, "macs": supernet.num_macs}
    space, rng = supernet.space, np.random.default_rng([cfg.seed, it, 29])
    archs: dict[str, Any] = {}
    for _ in range(100 * cfg.samples):
        if len(archs) == cfg.samples:
            break
        arch = space.sample(rng)
        if constraints.satisfied({k: costs[k](arch) for k in constraints.windows}):
            archs.setdefault(arch.key(), arch)
    path = folder / "samples.jsonl"
    rows = load_candidates(path)  # a line cut by kill -9 is dropped (that arch is scored again)
    if path.is_file():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    order = list(archs.values())
    if [r["key"] for r in rows] != [a.key() for a in order[: len(rows)]]:
        raise ValueError(f"{path}: holds other samples than this run draws (changed settings?); use another out_dir")
    with open(path, "a") as f:
        for arch in order[len(rows) :]:
            r = evaluator(arch)
            row = {"key": arch.key(), "arch": arch.to_dict(), "values": space.arch_values(arch), "top1": r["top1"]}
            row.update(error=100.0 - r["top1"], macs=costs["macs"](arch), params=costs["params"](arch))
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            rows.append(row)
            if progress:
                progress(f"score {it}", len(rows), len(order))
    return rows


def run_space_search(cfg: SpaceSearchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or continue) the iterations; returns the summary written to summary.json."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    space = load_space(cfg.space)
    if not hasattr(space, "ranges"):
        raise ValueError(f"space {cfg.space!r} ({type(space).__name__}) has no searchable ranges; use an S3 space")
    ranges = space.ranges()
    if cfg.dims:
        unknown = sorted(set(cfg.dims) - set(ranges))
        if unknown:
            raise ValueError(f"search-space config: unknown dims {unknown}; the space has {list(ranges)}")
        ranges = {k: v for k, v in ranges.items() if k in cfg.dims}
    grids = _grids(cfg, ranges)
    family = space.with_capacity({n: max(g) for n, g in grids.items()})  # one supernet shape for every space
    results: list[dict[str, Any]] = []
    for it in range(cfg.iterations):
        folder = out / f"iter_{it}"
        result_path = folder / "result.json"
        if result_path.is_file():
            results.append(json.loads(result_path.read_text()))
            ranges = {k: tuple(v) for k, v in results[-1]["next_ranges"].items()}
            continue
        folder.mkdir(parents=True, exist_ok=True)
        current = family.with_ranges(ranges).with_(name=f"{space.name}-iter{it}")
        current.to_yaml(folder / "space.yaml")
        ckpt = _train(cfg, it, folder / "space.yaml", folder, progress)
        rows = _score(cfg, it, ckpt, folder, progress)
        errors = et_error([r["error"] for r in rows], cfg.top_k)
        nxt, shifts = shift_ranges(ranges, grids, [(r["values"], r["error"]) for r in rows], min_t=cfg.min_t)
        result = {
            "iteration": it,
            "ranges": {k: list(v) for k, v in ranges.items()},
            "errors": errors,
            "best": min(rows, key=lambda r: r["error"])["key"],
            "shifts": {s.name: s.to_dict() for s in shifts},
            "next_ranges": {k: list(v) for k, v in nxt.items()},
            "space_yaml": str(folder / "space.yaml"),
            "supernet": str(ckpt),
        }
        atomic_write_text(result_path, json.dumps(result, indent=1))
        log.info("iteration %d: E %.2f T %.2f E-T %.2f", it, errors["E"], errors["T"], errors["ET"])
        results.append(result)
        ranges = nxt
    final = Path(results[-1]["space_yaml"])
    atomic_write_text(out / "final_space.yaml", final.read_text())
    summary = {
        "iterations": [{k: r[k] for k in ("iteration", "errors", "ranges", "best")} for r in results],
        "final_space": str(out / "final_space.yaml"),
        "grids": {k: list(v) for k, v in grids.items()},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    plot_space_search(results, out)
    return summary
