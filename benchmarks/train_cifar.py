"""Train the `cifar` supernet on CIFAR-10 for a time budget; prints one JSON line.

Reports training images/s, the data pipeline's images/s alone (batching + augmentation, which must
outrun training), and top-1 of the largest and smallest subnets on the held-out validation split and
on the test split.

    python benchmarks/train_cifar.py --budget-min 30 [--data ../shared/data/cifar10]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from vitnas.data import BatchAugment, epoch_batches, load_data, recipe
from vitnas.evaluation import evaluate
from vitnas.train import TrainConfig, Trainer
from vitnas.train.tasks import sample_step_archs

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def data_rate(data, cfg: TrainConfig, batches: int = 60) -> float:
    aug = BatchAugment(recipe(cfg.recipe), 32, data.num_classes)
    order = epoch_batches(len(data.train), cfg.batch_size, seed=1, epoch=0)[:batches]
    t = time.perf_counter()
    n = 0
    for images, labels in data.train.batches(order):
        x, _ = aug(images, labels)
        n += x.shape[0]
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--budget-min", type=float, default=30.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="at batch 512 (scaled by batch/512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sampling", default="uniform", choices=["uniform", "sandwich"])
    p.add_argument("--out", default="runs/bench_train_cifar")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"CIFAR-10 folders not found at {args.data}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_data(args.data, val_per_class=100, seed=0)
    load_s = time.perf_counter() - t0
    base = TrainConfig(
        space="cifar",
        data_path=args.data,
        recipe="cifar",
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=1.0,
        drop_path=0.0,
        sampling=args.sampling,
        out_dir=args.out,
        ckpt_every=500,
        log_every=50,
        threads=args.threads,
        epochs=1,
    )
    pipeline_ips = data_rate(data, base)
    # Probe the step rate, then size the run to the budget.
    probe = Trainer(TrainConfig(**{**base.to_dict(), "max_steps": 15}), data=data)
    probe.model.train()
    batches = probe.epoch_batches(0)[:15]
    t = time.perf_counter()
    for index, (images, labels) in zip(batches, data.train.batches(batches), strict=True):
        probe.train_step(images, labels, index)
        if probe.step == 3:
            t = time.perf_counter()
    step_s = (time.perf_counter() - t) / 12
    per_epoch = probe.steps_per_epoch * step_s + 20  # + validation
    epochs = max(1, math.floor(args.budget_min * 60 / per_epoch))
    cfg = TrainConfig(**{**base.to_dict(), "epochs": epochs})
    old = Path(args.out) / "last.safetensors"
    if old.is_file():  # a previous benchmark run: keep it aside, start afresh
        old.replace(old.with_suffix(".safetensors.old"))
    trainer = Trainer(cfg, data=data)
    t = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - t
    space = trainer.task.space
    result = {
        "benchmark": "train_cifar",
        "threads": args.threads,
        "torch": torch.__version__,
        "budget_min": args.budget_min,
        "epochs": epochs,
        "steps": trainer.step,
        "batch_size": args.batch_size,
        "sampling": args.sampling,
        "train_minutes": round(train_s / 60, 1),
        "decode_and_cache_s": round(load_s, 1),
        "train_images_per_s": round(
            trainer.step * args.batch_size * len(sample_step_archs(space, cfg, 0)) / train_s, 1
        ),
        "data_pipeline_images_per_s": round(pipeline_ips, 1),
    }
    result["pipeline_over_training"] = round(pipeline_ips / result["train_images_per_s"], 1)
    for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
        for split in ("val", "test"):
            r = evaluate(trainer.model, getattr(data, split), img_size=32, norm=trainer.aug_cfg, arch=arch)
            result[f"{split}_top1_{name}"] = round(r["top1"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
