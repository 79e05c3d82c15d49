"""Cream's claim at small scale on CIFAR-10: prioritized-path training (its board is the search result) vs
uniform single-path training (SPOS) + evolution, the same epochs, space, MACs window and seeds. One JSON line.

    python benchmarks/cream_cifar.py --data-path ../shared/data/cifar10 --space cream-cifar --epochs 6 --seeds 2

Both results are scored with weights inherited from their own supernet (BatchNorm statistics re-estimated
per path on 256 training images, as the search does), picked on the validation split held out of the
training images and then measured once on the test split. `--retrain-epochs N` also trains both winners
from scratch for N epochs and reports their test top-1. Runs resume (per supernet) after an interruption.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _runs import fit
from vitnas.data import AugmentConfig, load_data
from vitnas.evaluation import calibration_batches, evaluate, recalibrated_batchnorm
from vitnas.models.spec import load_model
from vitnas.search import Constraints, build_strategy, run_search
from vitnas.search.evaluator import SupernetEvaluator
from vitnas.space import load_space
from vitnas.supernet import build_supernet
from vitnas.train import TrainConfig, Trainer


def train_cfg(args: argparse.Namespace, method: str, seed: int, window: list) -> TrainConfig:
    cream = {"start_epoch": max(1, args.epochs // 4), "meta_every": args.meta_every, "board_size": args.board}
    return TrainConfig(
        min_mmacs=window[0],
        max_mmacs=window[1],
        task=method,
        space=args.space,
        data_path=args.data_path,
        img_size=32,
        recipe="cifar",
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=0.5,
        drop_path=0.0,
        seed=seed,
        threads=args.threads,
        ckpt_every=200,
        cream=cream if method == "cream" else {},
        out_dir=str(Path(args.out) / f"{method}-s{seed}"),
    )


def searched(args: argparse.Namespace, method: str, ckpt: Path, data, window: list, seed: int) -> tuple[dict, object]:
    """The method's result: the board's best path (Cream) or evolution's best (SPOS), its test top-1."""
    supernet, meta = load_model(ckpt)
    norm = AugmentConfig.from_dict(meta["norm"])
    calib = calibration_batches(data.train, 256, img_size=32, norm=norm)
    evaluator = SupernetEvaluator(supernet, data.val, img_size=32, norm=norm, calibration=calib)
    constraints = Constraints.from_dict({"macs": [None if w is None else w * 1e6 for w in window]})
    costs = {"params": supernet.num_params, "macs": supernet.num_macs}
    space = supernet.space
    if method == "cream":
        board = [space.arch_from_dict(e["arch"]) for e in meta["cream"]["board"]]
        strategy = build_strategy("board", space, initial=board)
    else:
        strategy = build_strategy(
            "evolution",
            space,
            feasible=lambda a: constraints.satisfied({"macs": supernet.num_macs(a)}),
            seed=seed,
            population=args.population,
            generations=args.generations,
            parents=max(args.population // 4, 2),
            mutations=args.population // 2,
            crossovers=args.population // 4,
        )
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = run_search(strategy, evaluator, costs=costs, constraints=constraints, out_dir=Path(tmp), resume=False)
    best = space.arch_from_dict(r.best["arch"])
    with supernet.active(best), recalibrated_batchnorm(supernet, calib):
        test = evaluate(supernet, data.test, img_size=32, norm=norm)["top1"]
    return {
        "arch": best.key(),
        "val_top1": round(r.best["top1"], 2),
        "test_top1": round(test, 2),
        "mmacs": round(supernet.num_macs(best) / 1e6, 2),
        "params_m": round(supernet.num_params(best) / 1e6, 3),
        "evaluations": len(r.candidates),
        "search_s": round(time.perf_counter() - t, 1),
        "board_top1": [e["top1"] for e in meta.get("cream", {}).get("board", [])],
    }, best


def retrained(args: argparse.Namespace, arch, data, seed: int, name: str) -> float:
    """Test top-1 of `arch` trained from scratch for --retrain-epochs."""
    arch_path = Path(args.out) / f"{name}-s{seed}-arch.yaml"
    arch.to_yaml(arch_path)
    cfg = TrainConfig(
        task="arch",
        space=args.space,
        arch=str(arch_path),
        data_path=args.data_path,
        img_size=32,
        recipe="cifar",
        epochs=args.retrain_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=0.5,
        seed=seed,
        threads=args.threads,
        ckpt_every=10**6,
        out_dir=str(Path(args.out) / f"retrain-{name}-s{seed}"),
    )
    trainer = Trainer(cfg, data=data, resume=True)
    if not trainer.is_finished():
        trainer.fit()
    model = trainer.model.eval()
    return round(evaluate(model, data.test, img_size=32, norm=trainer.aug_cfg)["top1"], 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default="../shared/data/cifar10", help="CIFAR-10 image folders")
    p.add_argument("--space", default="cream-cifar", help="space preset or YAML (cream-cifar, or the ViT 'cifar')")
    p.add_argument("--epochs", type=int, default=6, help="supernet training epochs (both methods)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per method")
    p.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument(
        "--lr", type=float, default=2e-2, help="peak lr at a batch of 512 (AdamW; MBConv nets want ~5x a ViT lr)"
    )
    p.add_argument("--board", type=int, default=10, help="Cream board size K")
    p.add_argument("--meta-every", type=int, default=50, help="steps between meta-network updates")
    p.add_argument("--mmacs", type=float, nargs=2, default=None, help="MACs window in millions (default: middle half)")
    p.add_argument("--population", type=int, default=10, help="SPOS evolution: population")
    p.add_argument("--generations", type=int, default=6, help="SPOS evolution: generations")
    p.add_argument("--retrain-epochs", type=int, default=0, help="also train both winners from scratch (0: skip)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="runs/cream_cifar", help="run folders (resumed when present)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    if not Path(args.data_path).is_dir():
        sys.exit(f"no CIFAR-10 folders at {args.data_path}")
    window = args.mmacs
    if window is None:  # the middle half of the space's MACs range
        net = build_supernet(load_space(args.space), img_size=32, num_classes=10)
        lo, hi = (net.num_macs(a) / 1e6 for a in (net.space.smallest(), net.space.largest()))
        window = [round(lo + (hi - lo) / 4, 2), round(hi - (hi - lo) / 4, 2)]
    rows: dict[str, list[dict]] = {"spos": [], "cream": []}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        data = load_data(args.data_path, img_size=32, val_per_class=100, seed=seed)
        for method, name in (("supernet", "spos"), ("cream", "cream")):
            ckpt, seconds = fit(train_cfg(args, method, seed, window), data)
            result, best = searched(args, method, ckpt, data, window, seed)
            row = {"seed": seed, "train_s": round(seconds, 1), **result}
            if args.retrain_epochs:
                row["retrain_test_top1"] = retrained(args, best, data, seed, name)
            rows[name].append(row)
            print(json.dumps({"progress": name, **row}), file=sys.stderr, flush=True)
    summary = {
        "benchmark": "cream_cifar",
        "space": args.space,
        "epochs": args.epochs,
        "mmacs_window": window,
        "threads": args.threads,
        "scored": "inherited weights (BN re-estimated per path), picked on val, test once",
        **{f"{k}_test_top1": [r["test_top1"] for r in v] for k, v in rows.items()},
        **{f"{k}_mean_test_top1": round(float(np.mean([r["test_top1"] for r in v])), 2) for k, v in rows.items()},
        "runs": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
