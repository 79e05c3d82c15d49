"""TinyCLIP's claim at small scale on CIFAR-10 captions: a student that inherits a teacher CLIP's weights and
mimics its affinities beats the same student trained from scratch with the contrastive loss, at equal steps.
One JSON line on stdout; progress on stderr.

    python benchmarks/tinyclip_cifar.py --data-path ../shared/data/cifar10 --teacher-epochs 3 --student-epochs 2

1. Teacher: a CLIP trained by vitnas (`task: clip`) from scratch on the training images captioned with CLIP's
   CIFAR-10 prompts ("a blurry photo of a {class}.", the prompt drawn per image and epoch): vision ViT 4 x 128
   (patch 4, 32 px), text 4 x 128, embedding 128.
2. Inherited: a student of half the teacher's depth and width (clip_tiny: 2 x 64 per tower, embedding 64)
   whose every tensor comes from the teacher (manual inheritance: layers 0 and 2, leading slices, first heads),
   trained by affinity mimicking (`task: tinyclip`, alpha = w = 1) for `--student-epochs`.
3. Scratch: the same student from a random init, trained with the contrastive loss (`task: clip`) for the
   same steps, batch, learning rate and augmentation.

All three are scored by zero-shot classification (the prompt ensemble of CLIP's 18 CIFAR-10 templates) on the
test split, once, at their last step. Without `--data-path` the bundled digits are used (digit prompts).
Runs resume after an interruption (`--out` keeps them); `--max-steps` caps every stage (to time a run).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from vitnas.data import load_data
from vitnas.data.tokenizer import tokenize
from vitnas.models.clip import CLIP_MEAN, CLIP_STD
from vitnas.models.spec import load_model
from vitnas.train import TrainConfig, Trainer
from vitnas.zeroshot import evaluate_zeroshot, zeroshot_classifier

log = logging.getLogger("tinyclip_cifar")

TEACHER = {
    "embed_dim": 128,
    "vision": {"width": 128, "layers": 4, "head_width": 32, "patch_size": 4},
    "text": {"width": 128, "layers": 4, "heads": 4, "head_width": 32},
}
STUDENT: dict = {}  # clip_tiny itself: 2 x 64 per tower (two heads of 32), patch 4, embedding 64


def stage_cfg(args: argparse.Namespace, name: str, **kw) -> TrainConfig:
    return TrainConfig(
        model="clip_tiny",
        data_path=args.data_path,
        img_size=32,
        recipe="cifar" if args.data_path else "digits",
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=0.5,
        weight_decay=0.1,
        val_per_class=args.val_per_class,
        seed=args.seed,
        threads=args.threads,
        amp=args.amp,
        max_steps=args.max_steps,
        ckpt_every=100,
        log_every=20,
        out_dir=str(Path(args.out) / name),
        **kw,
    )


def run(cfg: TrainConfig, data, name: str) -> tuple[Path, float]:
    """Train (or finish, or skip a finished) stage; (its checkpoint, seconds spent now)."""
    t0 = time.perf_counter()
    first: list[int] = []  # the first step this process ran (after a resume: not 1)

    def progress(info) -> None:
        first[:] = first or [info.step]
        if info.step % 50 == 0 or info.step == info.total:
            rate = (time.perf_counter() - t0) / (info.step - first[0] + 1)
            print(
                f"[{name}] step {info.step}/{info.total} epoch {info.epoch} loss {info.loss:.4f} ({rate:.2f} s/step)",
                file=sys.stderr,
                flush=True,
            )

    trainer = Trainer(cfg, data=data, resume=True, progress=progress)
    if not trainer.is_finished():
        trainer.fit()
    return trainer.ckpt_path, time.perf_counter() - t0


def zeroshot_test(ckpt: Path, data) -> dict:
    """Zero-shot top-1 / top-5 on the test split with the checkpoint's own prompts and caption length."""
    model, meta = load_model(ckpt)
    clip = meta["clip"]
    tok = lambda texts: tokenize(texts, clip["context_length"])  # noqa: E731
    classifier = zeroshot_classifier(model, clip["classnames"], clip["templates"], tok)
    r = evaluate_zeroshot(model, data.test, classifier, mean=CLIP_MEAN, std=CLIP_STD, img_size=meta["img_size"])
    return {
        "test_top1": round(r["top1"], 2),
        "test_top5": round(r["top5"], 2),
        "val_top1": round(meta["history"][-1]["val_top1"], 2),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "params_m_without_token_embedding": round(
            sum(p.numel() for n, p in model.named_parameters() if n != "token_embedding.weight") / 1e6, 3
        ),
        "steps": meta["step"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", help="CIFAR-10 image folders (default: the bundled digits)")
    p.add_argument("--out", default="runs/bench-tinyclip", help="run folders (kept: a rerun resumes or skips them)")
    p.add_argument("--teacher-epochs", type=int, default=3, help="epochs of the teacher's contrastive training")
    p.add_argument("--student-epochs", type=int, default=2, help="epochs of each student (equal steps for both)")
    p.add_argument("--batch-size", type=int, default=128, help="images (and captions) per step")
    p.add_argument("--lr", type=float, default=4e-3, help="peak lr at a batch of 512 (scaled to the batch)")
    p.add_argument("--val-per-class", type=int, default=100, help="training images per class held out for val")
    p.add_argument("--context-length", type=int, default=16, help="caption tokens (the prompts need at most 14)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order, prompts and augmentation")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--amp", default="off", help="autocast: off | bf16 | auto (see TrainConfig.amp)")
    p.add_argument("--max-steps", type=int, help="cap every stage at this many steps (to time a run)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    data = load_data(args.data_path, img_size=32, val_per_class=args.val_per_class, seed=args.seed)
    opts = {"context_length": args.context_length}
    teacher_cfg = stage_cfg(args, "teacher", task="clip", model_args=TEACHER, epochs=args.teacher_epochs, clip=opts)
    teacher, t_teacher = run(teacher_cfg, data, "teacher")
    inherited_cfg = stage_cfg(
        args,
        "inherited",
        task="tinyclip",
        model_args=STUDENT,
        teacher=str(teacher),
        epochs=args.student_epochs,
        clip={**opts, "init": "inherit"},
    )
    inherited, t_inherited = run(inherited_cfg, data, "inherited")
    scratch_cfg = stage_cfg(args, "scratch", task="clip", model_args=STUDENT, epochs=args.student_epochs, clip=opts)
    scratch, t_scratch = run(scratch_cfg, data, "scratch")
    results = {}
    for name, ckpt, seconds in (
        ("teacher", teacher, t_teacher),
        ("inherited", inherited, t_inherited),
        ("scratch", scratch, t_scratch),
    ):
        results[name] = {**zeroshot_test(ckpt, data), "train_seconds_this_run": round(seconds, 1)}
        log.info("%s: %s", name, results[name])
    out = {
        "benchmark": "tinyclip_cifar",
        "data": data.name,
        "test_images": len(data.test),
        "prompts": "CLIP's 18 CIFAR-10 templates" if args.data_path else "vitnas's 8 digit templates",
        **results,
        "inherited_minus_scratch_top1": round(results["inherited"]["test_top1"] - results["scratch"]["test_top1"], 2),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
