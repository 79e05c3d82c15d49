"""The distillation papers' relative claims at small scale, on CIFAR-10 image folders. Prints one JSON line.

1. TinyViT: a teacher trained by vitnas; its logits stored once (`save_logits`, top-K with replayed
   augmentation); the same student trained (a) from labels and (b) from the store, same epochs,
   recipe and seed. Expected: (b) > (a).
2. MiniViT: a small weight-multiplexed Mini-DeiT trained (c) from labels and (d) with MiniViT
   distillation (logits + attention relations + hidden-state relations) from the same teacher.
   Expected: (d) > (c).

A stratified subset of the training split keeps the run within about an hour on 2 CPU cores; the
validation split (held out of train) and the test split are CIFAR-10's full ones. Test top-1 reported.

    python benchmarks/distill_cifar.py --data ../shared/data/cifar10 [--train-per-class 600]
        [--teacher-epochs 12] [--student-epochs 8] [--topk 5] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from _runs import fit, test_top1
from vitnas import ArchConfig
from vitnas.data import ImageData, load_data
from vitnas.export import export_subnet
from vitnas.models.spec import load_model
from vitnas.train import TrainConfig
from vitnas.train.save_logits import SaveLogitsConfig, save_logits

TEACHER = ArchConfig(160, 6, (4.0,) * 6, (4,) * 6)  # the cifar space's largest subnet
STUDENT = ArchConfig(96, 4, (2.0,) * 4, (2,) * 4)  # its smallest
# A Mini-DeiT at 32 px: 4 layers in 2 weight-shared pairs, width 96, 3 heads, patch 4 (64 tokens).
MINI = dict(embed_dim=96, depth=4, num_heads=3, repeats=2, patch_size=4)


def train(out: Path, data: ImageData, base: dict, **kw) -> tuple[Path, float, float]:
    """(checkpoint, test top-1, seconds); an arch given as ArchConfig is written next to `out`."""
    if isinstance(kw.get("arch"), ArchConfig):
        kw["arch"].to_yaml(out.with_suffix(".yaml"))
        kw["arch"] = str(out.with_suffix(".yaml"))
    ckpt, seconds = fit(TrainConfig(**{**base, **kw, "task": "subnet", "out_dir": str(out)}), data)
    return ckpt, test_top1(ckpt, data), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="../shared/data/cifar10", help="CIFAR-10 image folders (train/, test/)")
    p.add_argument("--out", default="runs/bench-distill", help="work folder (reruns continue finished parts)")
    p.add_argument("--train-per-class", type=int, default=600, help="training images per class; 0 = all")
    p.add_argument("--teacher-epochs", type=int, default=12, help="teacher training epochs")
    p.add_argument("--student-epochs", type=int, default=8, help="epochs of every student (and stored epochs)")
    p.add_argument("--topk", type=int, default=5, help="stored probabilities per image (< 10 classes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds")
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr at batch 512 for every run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-minivit", action="store_true", help="only the stored-logit comparison")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.data, img_size=32, val_per_class=100, seed=0)
    if args.train_per_class > 0:
        data = data.with_train_per_class(args.train_per_class)
    base = dict(space="cifar", img_size=32, recipe="cifar", lr=args.lr, batch_size=128, threads=args.threads, seed=0)
    base.update(val_per_class=100, data_path=str(Path(args.data).resolve()), warmup_epochs=1.0, drop_path=0.0)
    t0 = time.perf_counter()
    teacher_ckpt, teacher_top1, teacher_s = train(out / "teacher", data, base, arch=TEACHER, epochs=args.teacher_epochs)
    model, meta = load_model(teacher_ckpt)
    teacher_dir = export_subnet(model, out / "teacher-export", extra={"norm": meta["norm"], "classes": data.classes})
    t = time.perf_counter()
    save_logits(
        SaveLogitsConfig(
            teacher=str(teacher_dir), out=str(out / "store"), img_size=32, val_per_class=100, seed=0,
            recipe="cifar", epochs=args.student_epochs, topk=args.topk, threads=args.threads,
        ),
        data=data,
    )  # fmt: skip
    save_s = time.perf_counter() - t
    rows = []
    for seed in args.seeds:
        s = dict(base, seed=seed, epochs=args.student_epochs)
        # one data split for all (data is passed in); the seed changes a student's init and data order
        row = {"seed": seed}
        _, row["a_labels"], row["a_s"] = train(out / f"a-{seed}", data, s, arch=STUDENT)
        _, row["b_store"], row["b_s"] = train(
            out / f"b-{seed}", data, s, arch=STUDENT, distill_logits=str(out / "store"), distill_alpha=1.0
        )
        if not args.skip_minivit:
            mini = dict(model="mini_deit_tiny_patch16_224", model_args=MINI)
            _, row["c_mini_labels"], row["c_s"] = train(out / f"c-{seed}", data, s, **mini)
            _, row["d_mini_minivit"], row["d_s"] = train(
                out / f"d-{seed}", data, s, **mini, teacher=str(teacher_dir), distill="minivit", distill_alpha=1.0
            )
        rows.append(row)
    print(
        json.dumps(
            {
                "bench": "distill_cifar",
                "train_images": len(data.train),
                "teacher": TEACHER.key(),
                "student": STUDENT.key(),
                "mini_deit": MINI,
                "teacher_epochs": args.teacher_epochs,
                "student_epochs": args.student_epochs,
                "topk": args.topk,
                "teacher_top1": teacher_top1,
                "teacher_s": round(teacher_s),
                "save_logits_s": round(save_s),
                "students": rows,
                "total_s": round(time.perf_counter() - t0),
            }
        )
    )


if __name__ == "__main__":
    main()
