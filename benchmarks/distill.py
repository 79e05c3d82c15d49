"""What stored teacher logits buy (TinyViT's fast distillation): one training step of a student alone,
with a live teacher (online KD), and from a logit store; and the throughput of `save_logits` against
the bare teacher forward it wraps. Interleaved rounds, medians. Prints one JSON line.

The images are random (timing only), the weights random: what is measured is the cost of each path.

    python benchmarks/distill.py [--teacher tiny_vit_21m_224] [--student efficientvit_m0] [--img-size 224]
        [--batch-size 32] [--device cpu|cuda] [--amp bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from vitnas.costs.macs import count_macs
from vitnas.data import ImageData, Split
from vitnas.distill import load_teacher
from vitnas.distill.logit_store import LogitStore
from vitnas.models import create_model
from vitnas.train import TrainConfig, Trainer
from vitnas.train.save_logits import SaveLogitsConfig, save_logits

sys.path.insert(0, str(Path(__file__).parent))


def synthetic_data(n: int, size: int, classes: int) -> ImageData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    split = Split(labels, images=images)
    return ImageData("random", [str(c) for c in range(classes)], split, split.subset(np.arange(64)), split)


def step_seconds(trainer: Trainer, steps: int, sync) -> float:
    """Median seconds of `steps` train steps on the trainer's own epoch-0 batches (after one warm-up)."""
    batches = trainer.epoch_batches(0)[: steps + 1]
    times = []
    for i, index in enumerate(batches):
        trainer.step = 0  # stay in epoch 0 (the store holds one epoch); the lr schedule does not matter here
        images, labels = next(iter(trainer.data.train.batches([index])))
        t = time.perf_counter()
        trainer.train_step(images, labels, index)
        sync()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher", default="tiny_vit_21m_224", help="registered teacher model")
    p.add_argument("--student", default="efficientvit_m0", help="registered student model")
    p.add_argument("--img-size", type=int, default=224, help="resolution of both (TinyViT windows need 224)")
    p.add_argument("--classes", type=int, default=100, help="classes of the random data")
    p.add_argument("--topk", type=int, default=10, help="stored probabilities per image")
    p.add_argument("--images", type=int, default=512, help="images in the store / timed by save-logits")
    p.add_argument("--batch-size", type=int, default=32, help="training and teacher batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--recipe", default="cifar", help="augmentation recipe (its mixing is replayed too)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", default="off", help="off | bf16 | fp16 (student training; teacher_dtype follows)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    kw = dict(num_classes=args.classes, img_size=args.img_size)
    macs = {"teacher": count_macs(args.teacher, **kw), "student": count_macs(args.student, **kw)}
    data = synthetic_data(args.images, args.img_size, args.classes)
    teacher_dtype = {"off": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.amp]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save_file(create_model(args.teacher, **kw).state_dict(), tmp / "teacher.safetensors")
        tw = str(tmp / "teacher.safetensors")
        common = dict(teacher=args.teacher, teacher_weights=tw, teacher_dtype=teacher_dtype, recipe=args.recipe)
        save_cfg = lambda r: SaveLogitsConfig(  # noqa: E731
            **common, out=str(tmp / f"store{r}"), img_size=args.img_size, epochs=1, topk=args.topk,
            batch_size=args.batch_size, chunk_size=args.images,
        )  # fmt: skip
        bare = load_teacher(args.teacher, weights=tw, dtype=teacher_dtype, **kw).to(dev)
        x_all = torch.randn(args.images, 3, args.img_size, args.img_size)
        base = dict(task="subnet", model=args.student, img_size=args.img_size, recipe=args.recipe, epochs=1)
        base.update(batch_size=args.batch_size, amp=args.amp, drop_path=0.0)
        trainers = {}
        figures: dict[str, list[float]] = {k: [] for k in ("plain", "online", "store", "bare_ips", "save_ips")}
        for r in range(args.rounds):
            t = time.perf_counter()
            for i in range(0, args.images, args.batch_size):
                bare(x_all[i : i + args.batch_size].to(dev))
            sync()
            figures["bare_ips"].append(args.images / (time.perf_counter() - t))
            t = time.perf_counter()
            save_logits(save_cfg(r), device=dev, data=data)
            sync()
            figures["save_ips"].append(args.images / (time.perf_counter() - t))
            if not trainers:
                store = str(tmp / "store0")
                paths = {"plain": {}, "online": dict(teacher=args.teacher, teacher_weights=tw), "store": {}}
                paths["online"]["teacher_dtype"] = teacher_dtype
                paths["store"] = dict(distill_logits=store, distill_alpha=1.0)
                for name, extra in paths.items():
                    cfg = TrainConfig(**base, **extra, out_dir=str(tmp / f"run-{name}"))
                    trainers[name] = Trainer(cfg, data=data, device=dev)
            for name, trainer in trainers.items():
                figures[name].append(step_seconds(trainer, args.steps, sync))
        record = LogitStore(tmp / "store0").dtype.itemsize
    med = {k: statistics.median(v) for k, v in figures.items()}
    out = {
        "bench": "distill",
        "device": str(dev),
        "amp": args.amp,
        "teacher": args.teacher,
        "student": args.student,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "teacher_macs_M": round(macs["teacher"] / 1e6),
        "student_macs_M": round(macs["student"] / 1e6),
        "macs_ratio": round(macs["teacher"] / macs["student"], 1),
        "step_ms": {k: round(med[k] * 1e3, 1) for k in ("plain", "online", "store")},
        "store_vs_plain": round(med["store"] / med["plain"], 3),
        "online_vs_store": round(med["online"] / med["store"], 2),
        "bare_teacher_images_per_s": round(med["bare_ips"], 1),
        "save_logits_images_per_s": round(med["save_ips"], 1),
        "save_vs_bare": round(med["save_ips"] / med["bare_ips"], 3),
        "record_bytes": record,
        "expected_record_bytes": 4 * args.topk + 4,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
