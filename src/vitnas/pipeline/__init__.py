"""The main job, from one YAML: train the supernet (or load one), search under constraints, export the
winner, optionally fine-tune it, and report. Every stage writes its artefact into `out_dir`, and a
rerun continues where the last one stopped (training resumes, the search resumes per generation).
The stages are in `vitnas.pipeline.stages`; this module runs them in order and writes the summary."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from vitnas._io import atomic_write_text
from vitnas.costs.latency import measure_latency
from vitnas.costs.macs import model_input_size
from vitnas.evaluation import evaluate, recalibrated_batchnorm
from vitnas.export import export_subnet
from vitnas.models.spec import load_model
from vitnas.pipeline.config import PipelineConfig
from vitnas.pipeline.stages import (
    Progress,
    Run,
    finetune_stage,
    latency_report,
    paired_comparison,
    search_stage,
    split_half_tau,
    supernet_stage,
    supernet_test_top1,
)
from vitnas.report import top1_standard_error
from vitnas.search import Constraints, SearchConfig, torch_workers
from vitnas.train.dist import init_distributed
from vitnas.train.runtime import runtime_settings

__all__ = ["PipelineConfig", "Progress", "choose_weights", "run_pipeline"]

log = logging.getLogger(__name__)


def run_pipeline(
    cfg: PipelineConfig,
    *,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Run every stage; returns the summary (also written to out_dir/summary.json). `progress(stage,
    done, total, info)` is called as each stage advances."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scfg = SearchConfig.from_dict(cfg.search, source=f"{cfg.source}: search")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: DDP training, candidates sharded over ranks
        info = init_distributed(device)
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(device)
    workers = torch_workers()
    run = Run(cfg, out, device, progress, resume, scfg, Constraints.from_dict(scfg.constraints), workers)
    if not resume and workers.is_main:
        _move_aside_old_checkpoints(out)
    workers.barrier()
    # The training config's threads / deterministic settings hold for the whole run, search included.
    with runtime_settings(cfg.train.get("threads"), bool(cfg.train.get("deterministic", False))):
        supernet_stage(run)
        search_stage(run)
        return _export_stage(run)


def choose_weights(inherited_top1: float, finetune_best: dict[str, Any] | None) -> tuple[bool, str]:
    """(export the fine-tune's best checkpoint?, why): only when its validation top-1 beats the weights
    inherited from the supernet, which are measured on the same validation images."""
    if finetune_best is None:
        return False, f"inherited from the supernet (val {inherited_top1:.2f}%; the fine-tune was never evaluated)"
    value, epoch = finetune_best["value"], finetune_best["epoch"]
    if value > inherited_top1:
        return True, f"fine-tuned, best epoch {epoch} (val {value:.2f}% > {inherited_top1:.2f}% inherited)"
    return False, f"inherited from the supernet (val {inherited_top1:.2f}%; the fine-tune peaked at {value:.2f}%)"


def _move_aside_old_checkpoints(out: Path) -> None:
    """Start over, keeping the old checkpoints aside rather than deleting them."""
    for stage in ("supernet", "finetune"):
        old = out / stage / "last.safetensors"
        if old.is_file():
            old.replace(old.with_suffix(".safetensors.old"))
            log.warning("moved %s aside to %s", old, old.with_suffix(".safetensors.old"))


def _export_stage(run: Run) -> dict[str, Any]:
    """Export the winner (inherited weights, or fine-tuned ones), measured on the test split."""
    scfg, data = run.search, run.data
    main = run.results[scfg.strategy]
    best_arch = run.supernet.space.arch_from_dict(main.best["arch"], source="search result")
    with run.supernet.active(best_arch), recalibrated_batchnorm(run.supernet, run.calibration):
        model = run.supernet.extract(best_arch)  # with the BatchNorm statistics it was scored with
    norm, img_size = run.norm, run.meta["img_size"]
    record: dict[str, Any] = {
        "arch": best_arch.to_dict(),
        "search": {k: main.best[k] for k in ("top1", "loss")},
        "supernet_checkpoint": str(run.ckpt),
        "classes": data.classes,
        "norm": norm.to_dict(),
    }
    finetune_top1, weights = None, "inherited from the supernet (no fine-tune)"
    if run.cfg.finetune_epochs > 0:
        ft = finetune_stage(run, run.out / "search" / scfg.strategy / "best.yaml")
        finetune_top1 = ft.best["value"] if ft.best else None  # its best epoch, the one that may be exported
        use_finetuned, weights = choose_weights(main.best["top1"], ft.best)
        if use_finetuned:
            model, _ = load_model(ft.best_path)
            norm, img_size = ft.aug_cfg, ft.img_size
        last = ft.history[-1]["val_top1"] if ft.history else None
        record["finetune"] = {"epochs": run.cfg.finetune_epochs, "val_top1_last": last, "best": ft.best}
    record["weights"] = weights
    if not run.workers.is_main:  # the other ranks helped train and search; rank 0 measures and writes
        run.workers.barrier()
        return json.loads((run.out / "summary.json").read_text())
    log.info("exporting %s with weights %s", best_arch.key(), weights)
    model = model.eval().to(run.device)
    test = evaluate(model, data.test, img_size=img_size, norm=norm, device=run.device)  # reported, never ranked on
    record["test_top1"] = test["top1"]
    _, h, w = model_input_size(model)
    batches = {1, scfg.latency_batch}
    latency = {b: measure_latency(model, torch.randn(b, 3, h, w, device=run.device)) for b in batches}
    export_dir = export_subnet(model.cpu(), run.out / "export", extra=record, onnx=run.cfg.onnx)
    best = {
        "arch": best_arch.key(),
        "params": run.supernet.num_params(best_arch),
        "macs": run.supernet.num_macs(best_arch),
        "latency_ms": latency[scfg.latency_batch],
        "latency_ms_by_batch": latency,
        "latency_device": str(run.device),
        "val_top1_inherited": main.best["top1"],
        "val_top1_finetuned": finetune_top1,
        "exported_weights": weights,
        "test_top1": test["top1"],
    }
    return _write_summary(run, best, export_dir)


def _unbiased_sample(run: Run) -> list[dict[str, Any]]:
    """Fully scored candidates drawn uniformly from the feasible archs: random search's (or, without it,
    the first generation of the main search, which is random too)."""
    if "random" in run.results:
        rows = run.results["random"].candidates
    else:
        rows = [r for r in run.results[run.search.strategy].candidates if r["generation"] == 0]
    return [r for r in rows if not r.get("screened_out")]


def _write_summary(run: Run, best: dict[str, Any], export_dir: Path) -> dict[str, Any]:
    history = run.meta.get("history") or [{}]
    n_val = len(run.data.val)
    summary = {
        "data": run.data.summary(),
        "space": run.supernet.space.name,
        "space_size": run.supernet.space.size(),
        "supernet_checkpoint": str(run.ckpt),
        "supernet_val_top1": {k: v for k, v in history[-1].items() if k.startswith("val_top1")},
        "supernet_test_top1": supernet_test_top1(run),
        "val_images": n_val,
        "constraints": run.constraints.to_dict(),
        "feasible_ranges": run.ranges,
        "strategies": {
            n: {
                "evaluations": len(r.candidates),
                "best_top1": r.best["top1"] if r.best else None,
                "best_loss": r.best.get("loss") if r.best else None,
                "best_top1_standard_error": top1_standard_error(r.best["top1"], n_val) if r.best else None,
                "best_per_generation": r.best_per_generation,
            }
            for n, r in run.results.items()
        },
        "split_half": split_half_tau(_unbiased_sample(run)),
        "paired": paired_comparison(run),
        "best": best,
        "pareto_front": [
            {"arch": r["key"], "top1": r["top1"], "params": r["params"], "macs": r["macs"]}
            for r in run.fronts["params"]
        ],
        "latency_table": latency_report(run),
        "export": str(export_dir),
        "plots": [str(p) for p in run.plots],
        "seconds": run.timings,
    }
    atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=1, default=str))
    run.workers.barrier()
    return summary
