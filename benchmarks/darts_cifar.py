"""CDARTS vs first-order DARTS at equal budget on CIFAR-10, then both genotypes (and a random one) retrained
from scratch. One JSON line.

    python benchmarks/darts_cifar.py --per-class 400 --epochs 7 --retrain-epochs 5 --retrain-seeds 0 1 --threads 1

Both searches run on the same images (`--per-class` training images per class, split 50/50 into the weights'
and α's halves), the same space (`darts-small`: search network 8 channels x 1+1+1 cells, evaluation network
8 x 2+2+2), the same epochs, batch and seed. CDARTS spends its first epoch warming the search network up and
then cycles (evaluation-network warm-up for 1 epoch, search for 2); DARTS warms up for 1 epoch and searches
the rest. The derived genotypes, and one drawn at random from the space as a control, are then trained
from scratch (16 channels x 2+2+2 cells, auxiliary head) on the same training images for `--retrain-epochs`,
picked at their last epoch and measured once on the test split, once per `--retrain-seeds` seed (the
spread between seeds is the noise that the genotypes' differences must beat). Runs resume after an interruption.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from _runs import fit, test_top1
from vitnas.checkpoint import read_metadata
from vitnas.data import load_data
from vitnas.space import load_space
from vitnas.space.darts import Genotype
from vitnas.supernet import build_supernet
from vitnas.train import TrainConfig


def search_cfg(args: argparse.Namespace, method: str) -> TrainConfig:
    darts = {
        "pretrain_epochs": 1,
        "eval_warmup_epochs": 1,
        "cycle_epochs": 2,
        "alpha_lr": args.alpha_lr,
    }
    return TrainConfig(
        task=method,
        space=args.space,
        data_path=args.data_path,
        img_size=32,
        recipe="cifar",
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer="sgd",
        lr=0.05 * 512 / args.batch_size,  # the reference's search lr 0.05 at this batch (lr is given per 512)
        min_lr=0.001,
        warmup_epochs=0.0,
        weight_decay=3e-4,
        drop_path=0.0,
        seed=args.seed,
        threads=args.threads,
        darts=darts,
        amp=args.amp,
        out_dir=str(Path(args.out) / f"search-{method}"),
    )


def retrain_cfg(args: argparse.Namespace, name: str, arch_path: Path, seed: int) -> TrainConfig:
    return TrainConfig(
        task="arch",
        space=args.space,
        arch=str(arch_path),
        data_path=args.data_path,
        img_size=32,
        recipe="cifar",
        epochs=args.retrain_epochs,
        batch_size=args.batch_size,
        optimizer="sgd",
        lr=0.025 * 512 / 128,  # the reference's retrain lr 0.025 at batch 128
        min_lr=0.0,
        warmup_epochs=0.0,
        weight_decay=3e-4,
        drop_path=0.0,
        seed=seed,  # weights, order and augmentation; the data split is the search's (passed in)
        threads=args.threads,
        amp=args.amp,
        out_dir=str(Path(args.out) / (f"retrain-{name}" if seed == args.seed else f"retrain-{name}-s{seed}")),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", default="../shared/data/cifar10", help="CIFAR-10 image folders")
    p.add_argument("--space", default="darts-small", help="DARTS space preset or YAML")
    p.add_argument("--per-class", type=int, default=400, help="training images per class (split 50/50 for search)")
    p.add_argument("--epochs", type=int, default=7, help="search epochs (both methods)")
    p.add_argument("--retrain-epochs", type=int, default=5, help="from-scratch training epochs of each genotype")
    p.add_argument("--batch-size", type=int, default=64, help="batch of every step")
    p.add_argument(
        "--retrain-seeds", type=int, nargs="+", default=[0], help="seeds of the from-scratch runs of each genotype"
    )
    p.add_argument("--alpha-lr", type=float, default=3e-3, help="Adam lr of α (reference 6e-4 over far more steps)")
    p.add_argument("--amp", default="off", help="autocast: off | auto | bf16")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, weights and order")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="runs/darts_cifar", help="run folders (resumed when present)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = load_data(args.data_path, img_size=32, val_per_class=100, seed=args.seed)
    data = data.with_train_per_class(args.per_class, seed=args.seed)
    space = load_space(args.space)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"space": args.space, "train_images": len(data.train), "epochs": args.epochs}
    genotypes = {}
    for method in ("darts", "cdarts"):
        ckpt, seconds = fit(search_cfg(args, method), data)
        meta = read_metadata(ckpt)
        genotypes[method] = Genotype.from_str(meta["darts"]["genotype"])
        last = meta["history"][-1]
        summary[method] = {"search_s": round(seconds, 1), "search_val_top1": last["val_top1"]}
        print(json.dumps({"progress": f"search {method}", **summary[method]}), file=sys.stderr, flush=True)
    genotypes["random"] = space.sample(np.random.default_rng(args.seed))
    pool = build_supernet(space, img_size=32, num_classes=data.num_classes)  # costs of the retrained networks
    for name, genotype in genotypes.items():
        arch_path = out / f"{name}.yaml"
        genotype.to_yaml(arch_path)
        row = summary.setdefault(name, {})
        row.update(genotype=genotype.to_str(), params=pool.num_params(genotype))
        row["mmacs"] = round(pool.num_macs(genotype) / 1e6, 2)
        for seed in args.retrain_seeds:
            ckpt, seconds = fit(retrain_cfg(args, name, arch_path, seed), data)
            run = {"seed": seed, "s": round(seconds, 1), "val_top1": read_metadata(ckpt)["history"][-1]["val_top1"]}
            run["test_top1"] = test_top1(ckpt, data)
            row.setdefault("retrain", []).append(run)
            print(json.dumps({"progress": f"retrain {name}", **run}), file=sys.stderr, flush=True)
        row["test_top1_mean"] = round(float(np.mean([r["test_top1"] for r in row["retrain"]])), 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
