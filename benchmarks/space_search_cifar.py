"""Searching the search space on CIFAR-10 (S3 at small scale). One JSON line.

    python benchmarks/space_search_cifar.py --data-path ../shared/data/cifar10 --out runs/space_search_cifar

1. `vitnas search-space` on the `s3-cifar` space (32 px): per iteration a supernet is trained (the first)
   or fine-tuned from the previous one, `--samples` archs are scored with inherited weights on the
   validation split held out of the training images, and the ranges move (E, T, E-T error per iteration).
   A control runs the same schedule with ranges that never move (its iteration 0 is the search's own):
   how much of the falling E-T error is the extra training rather than the better space.
2. The same search budget in the initial and in the final space: evolution (`--population` x
   `--generations`) on the initial space's supernet and on the final space's, each picking its best by
   validation top-1; both winners are then trained from scratch for `--retrain-epochs` and measured once
   on the test split. Everything resumes after an interruption.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitnas.data import AugmentConfig, load_data_of
from vitnas.evaluation import evaluate
from vitnas.models.spec import load_model
from vitnas.pipeline.space_search import SpaceSearchConfig, run_space_search
from vitnas.search import Constraints, build_strategy, run_search
from vitnas.search.evaluator import SupernetEvaluator
from vitnas.train import TrainConfig, Trainer


def best_in(ckpt: Path, args: argparse.Namespace, seed: int) -> tuple[object, dict]:
    """Evolution's best arch (by validation top-1, inherited weights) on the supernet at `ckpt`."""
    supernet, meta = load_model(ckpt)
    data = load_data_of(meta, source=str(ckpt))
    norm = AugmentConfig.from_dict(meta["norm"])
    evaluator = SupernetEvaluator(supernet, data.val, img_size=meta["img_size"], norm=norm)
    space = supernet.space
    strategy = build_strategy(
        "evolution",
        space,
        seed=seed,
        population=args.population,
        generations=args.generations,
        parents=max(args.population // 4, 2),
        mutations=args.population // 2,
        crossovers=args.population // 4,
    )
    costs = {"params": supernet.num_params, "macs": supernet.num_macs}
    with tempfile.TemporaryDirectory() as tmp:
        r = run_search(strategy, evaluator, costs=costs, constraints=Constraints.from_dict({}), out_dir=Path(tmp))
    arch = space.arch_from_dict(r.best["arch"])
    return arch, {
        "arch": arch.key(),
        "val_top1_inherited": round(r.best["top1"], 2),
        "params_m": round(supernet.num_params(arch) / 1e6, 3),
        "mmacs": round(supernet.num_macs(arch) / 1e6, 2),
        "evaluations": len(r.candidates),
    }


def retrain(arch, space_yaml: str, name: str, args: argparse.Namespace) -> float:
    """Test top-1 of `arch` trained from scratch (same recipe and epochs for both winners)."""
    out = Path(args.out) / f"retrain-{name}"
    out.mkdir(parents=True, exist_ok=True)
    arch.to_yaml(out / "arch.yaml")
    cfg = TrainConfig(
        **{**train_settings(args), "task": "arch", "space": space_yaml, "arch": str(out / "arch.yaml")},
        epochs=args.retrain_epochs,
        out_dir=str(out),
    )
    trainer = Trainer(cfg, resume=True)
    if not trainer.is_finished():
        trainer.fit()
    model = trainer.model.eval()
    return round(evaluate(model, trainer.data.test, img_size=32, norm=trainer.aug_cfg)["top1"], 2)


def control_run(cfg: SpaceSearchConfig) -> dict:
    """The same iterations with ranges that never move, starting from the search's own iteration 0."""
    import dataclasses
    import shutil

    out = Path(cfg.out_dir).parent / "control"
    src, dst = Path(cfg.out_dir) / "iter_0", out / "iter_0"
    if not dst.exists():
        dst.mkdir(parents=True)
        shutil.copytree(src / "supernet", dst / "supernet")
        shutil.copy(src / "samples.jsonl", dst / "samples.jsonl")  # supernet/trained.json comes along
    return run_space_search(dataclasses.replace(cfg, out_dir=str(out), min_t=float("inf")))


def train_settings(args: argparse.Namespace) -> dict:
    return dict(
        data_path=args.data_path,
        img_size=32,
        recipe="cifar" if args.data_path else "digits",
        batch_size=128,
        lr=args.lr,
        warmup_epochs=0.3,
        drop_path=0.0,
        threads=args.threads,
        ckpt_every=200,
        seed=0,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default="../shared/data/cifar10", help="CIFAR-10 image folders ('digits': smoke run)")
    p.add_argument("--iterations", type=int, default=3, help="spaces measured")
    p.add_argument("--epochs", type=int, default=3, help="supernet epochs on the initial space")
    p.add_argument("--finetune-epochs", type=int, default=2, help="supernet epochs on each later space")
    p.add_argument("--samples", type=int, default=60, help="archs scored per space")
    p.add_argument("--top-k", type=int, default=10, help="top tier size (T)")
    p.add_argument("--min-t", type=float, default=2.0, help="t statistic a dimension's slope needs to move")
    p.add_argument("--population", type=int, default=10, help="evolution population in each space")
    p.add_argument("--generations", type=int, default=5, help="evolution generations in each space")
    p.add_argument("--retrain-epochs", type=int, default=5, help="from-scratch epochs for both winners")
    p.add_argument("--lr", type=float, default=1e-2, help="peak lr at a batch of 512 (AdamW)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="runs/space_search_cifar", help="run folder (resumed when present)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    if args.data_path == "digits":  # a smoke run on the embedded digits
        args.data_path = None
    elif not Path(args.data_path).is_dir():
        sys.exit(f"no CIFAR-10 folders at {args.data_path}")
    dims = [f"{d}.{i}" for d in ("embed_dims", "depths", "mlp_ratios", "num_heads") for i in range(4)]
    cfg = SpaceSearchConfig(
        out_dir=str(Path(args.out) / "space_search"),
        space="s3-cifar",
        dims=dims,
        grid_extend=1,
        iterations=args.iterations,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        samples=args.samples,
        top_k=args.top_k,
        min_t=args.min_t,
        train=train_settings(args),
    )
    t = time.perf_counter()
    summary = run_space_search(cfg, lambda stage, done, total: None)
    space_s = time.perf_counter() - t
    its = summary["iterations"]
    first = Path(cfg.out_dir) / "iter_0"
    last = Path(cfg.out_dir) / f"iter_{len(its) - 1}"
    result = {"benchmark": "space_search_cifar", "space_search_s": round(space_s, 1)}
    result["et_error"] = [round(it["errors"]["ET"], 2) for it in its]
    result["E"] = [round(it["errors"]["E"], 2) for it in its]
    result["T"] = [round(it["errors"]["T"], 2) for it in its]
    result["ranges"] = [it["ranges"] for it in its]
    control = control_run(cfg)
    result["control_et_error"] = [round(it["errors"]["ET"], 2) for it in control["iterations"]]
    for name, folder in (("initial", first), ("final", last)):
        arch, row = best_in(folder / "supernet" / "last.safetensors", args, seed=0)
        row["retrain_test_top1"] = retrain(arch, str(folder / "space.yaml"), name, args)
        result[name] = row
        print(json.dumps({"progress": name, **row}), file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
