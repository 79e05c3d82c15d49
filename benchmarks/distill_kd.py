"""Online knowledge distillation at small scale: does a student distilled from a bigger teacher beat the
same student trained from labels, with the same epochs and recipe? Prints one JSON line.

Data: the embedded digits (default) or an image folder (--data, e.g. ../shared/data/cifar10). The
teacher and the students are archs of the data's space, trained with `vitnas.train.Trainer`; test top-1
of the teacher, of each student from labels (a) and distilled (b), per seed.

    python benchmarks/distill_kd.py [--seeds 0 1 2] [--teacher-epochs 30] [--student-epochs 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vitnas import ArchConfig
from vitnas.data import AugmentConfig
from vitnas.evaluation import evaluate
from vitnas.models.spec import load_model
from vitnas.train import TrainConfig, Trainer


def train(out: Path, arch: ArchConfig, epochs: int, seed: int, base: dict, **kw) -> tuple[Path, float]:
    arch.to_yaml(out.with_suffix(".yaml"))
    cfg = TrainConfig(
        **base, task="subnet", arch=str(out.with_suffix(".yaml")), epochs=epochs, seed=seed, out_dir=str(out), **kw
    )
    trainer = Trainer(cfg)
    trainer.fit()
    model, meta = load_model(trainer.ckpt_path)
    norm = AugmentConfig.from_dict(meta["norm"])
    top1 = evaluate(model, trainer.data.test, img_size=meta["img_size"], norm=norm)["top1"]
    return trainer.ckpt_path, top1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", help="image folder; default: the embedded digits")
    p.add_argument("--space", default="digits", help="space of the archs (digits, or cifar for 32 px folders)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    p.add_argument("--teacher-epochs", type=int, default=30, help="teacher training epochs")
    p.add_argument("--student-epochs", type=int, default=15, help="epochs of each student")
    p.add_argument("--alpha", type=float, default=0.7, help="weight of the distillation loss")
    p.add_argument("--tau", type=float, default=2.0, help="soft KD temperature")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    base = dict(
        space=args.space,
        recipe="digits" if args.data is None else "cifar",
        data_path=args.data,
        batch_size=64,
        lr=4e-3,
        warmup_epochs=1.0,
        val_per_class=20,
        threads=args.threads,
        log_every=50,
    )
    teacher_arch = ArchConfig(96, 4, (4.0,) * 4, (4,) * 4)
    student_arch = ArchConfig(48, 2, (2.0,) * 2, (2,) * 2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, teacher_top1 = train(root / "teacher", teacher_arch, args.teacher_epochs, 0, base)
        labels, distilled = [], []
        for seed in args.seeds:
            labels.append(train(root / f"a{seed}", student_arch, args.student_epochs, seed, base)[1])
            distilled.append(
                train(
                    root / f"b{seed}",
                    student_arch,
                    args.student_epochs,
                    seed,
                    base,
                    teacher=str(teacher),
                    distill="soft",
                    distill_alpha=args.alpha,
                    distill_tau=args.tau,
                )[1]
            )
    mean = statistics.fmean
    print(
        json.dumps(
            {
                "benchmark": "distill_kd",
                "data": args.data or "digits",
                "torch": torch.__version__,
                "teacher": {"arch": teacher_arch.key(), "epochs": args.teacher_epochs, "test_top1": teacher_top1},
                "student": {"arch": student_arch.key(), "epochs": args.student_epochs, "seeds": args.seeds},
                "kd": {"kind": "soft", "alpha": args.alpha, "tau": args.tau},
                "student_labels_test_top1": labels,
                "student_kd_test_top1": distilled,
                "mean_labels": mean(labels),
                "mean_kd": mean(distilled),
                "kd_minus_labels_per_seed": [b - a for a, b in zip(labels, distilled, strict=True)],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
