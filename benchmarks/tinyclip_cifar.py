"""TinyCLIP's claim at small scale on CIFAR-10 captions: a student that inherits a teacher CLIP's weights and
mimics its affinities beats the same student trained from scratch with the contrastive loss, at equal steps;
how automatic inheritance (learned masks, progressive stages) compares with manual inheritance; and, by two
controls that train the auto arm's final architecture from a random init, how much of that is its architecture.
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
4. Auto: automatic inheritance in progressive stages (TinyCLIP's CoFi-style masks), the same total steps.
   Each masked stage is `task: tinyclip` with `clip.auto`: the student starts as the previous stage's pruned
   model (stage 1: the teacher itself) and learns hard-concrete masks over heads, MLP units and hidden channels,
   pushed by a Lagrangian to a sparsity that leaves `--auto-keep` of the teacher's prunable (attention + MLP)
   parameters (the last stage: clip_tiny's share, about 0.126, so the pruned student matches the manual one's
   prunable size); the stage is then pruned (`prune_checkpoint`) and the next starts from it with a target
   relative to its own size. A fine-tune stage without masks takes the remaining steps. Each stage is a fresh
   run (its own lr warm-up and cosine decay, the same share of warm-up as the other students); stage k draws
   its data order with seed + k, so the stages do not all replay epoch 0's first batches.
5. Controls for the auto arm's architecture (the pruned model its fine-tune trained: `clip_tiny` with the
   pruned config as `model_args`, checked to have exactly the pruned model's parameters), from a random init
   for the students' steps, batch, lr and augmentation, seed as the other students: `auto_arch_scratch`
   (contrastive, `task: clip`) and `auto_arch_affinity` (affinity mimicking from the same teacher,
   `task: tinyclip`, `clip.init: scratch`: the auto arm's and the inherited arm's loss, without their weights).

All are scored by zero-shot classification (the prompt ensemble of CLIP's 18 CIFAR-10 templates) on the
test split, once, at their last step. Without `--data-path` the bundled digits are used (digit prompts).
Runs resume after an interruption (`--out` keeps them); `--max-steps` caps every stage (to time a run; the
auto arm splits the capped student steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from vitnas.checkpoint import read_metadata
from vitnas.data import load_data
from vitnas.data.tokenizer import tokenize
from vitnas.models.clip import CLIP_MEAN, CLIP_STD, CLIPConfig
from vitnas.models.registry import create_model
from vitnas.models.spec import load_model
from vitnas.train import TrainConfig, Trainer
from vitnas.train.tasks.clip import clip_config_of, prune_checkpoint, stage_target
from vitnas.train.tasks.clip import prunable_params as prunable
from vitnas.zeroshot import evaluate_zeroshot, zeroshot_classifier

log = logging.getLogger("tinyclip_cifar")

TEACHER = {
    "embed_dim": 128,
    "vision": {"width": 128, "layers": 4, "head_width": 32, "patch_size": 4},
    "text": {"width": 128, "layers": 4, "heads": 4, "head_width": 32},
}
STUDENT: dict = {}  # clip_tiny itself: 2 x 64 per tower (two heads of 32), patch 4, embedding 64
WARMUP_EPOCHS = 0.5  # the students' lr warm-up; an auto stage warms up over the same share of its steps


def stage_cfg(args: argparse.Namespace, name: str, **kw) -> TrainConfig:
    """A stage's TrainConfig. Students take `--student-seed` (weights, data order, prompts, augmentation) and,
    when it differs from `--seed`, run in folders suffixed with it, next to the same teacher's other seeds."""
    student = name != "teacher"
    seed = args.student_seed if student else args.seed
    if student and seed != args.seed:
        name = f"{name}-seed{seed}"
    base = {
        "model": "clip_tiny",
        "data_path": args.data_path,
        "img_size": 32,
        "recipe": "cifar" if args.data_path else "digits",
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_epochs": WARMUP_EPOCHS,
        "weight_decay": 0.1,
        "val_per_class": args.val_per_class,
        "seed": seed,
        "threads": args.threads,
        "amp": args.amp,
        "max_steps": args.max_steps,
        "ckpt_every": 100,
        "log_every": 20,
        "out_dir": str(Path(args.out) / name),
    }
    return TrainConfig(**{**base, **kw})


def run(cfg: TrainConfig, data, name: str, trace: list | None = None) -> tuple[Trainer, float]:
    """Train (or finish, or skip a finished) stage; (its trainer, seconds spent now). Under automatic
    inheritance the progress lines show the expected / scheduled sparsity, and `trace` collects
    (step, expected, target) every 25 steps."""
    t0 = time.perf_counter()
    first: list[int] = []  # the first step this process ran (after a resume: not 1)

    def progress(info) -> None:
        first[:] = first or [info.step]
        m = info.metrics
        if "expected_sparsity" in m and trace is not None and (info.step % 25 == 0 or info.step == info.total):
            trace.append([info.step, round(m["expected_sparsity"], 4), round(m["target_sparsity"], 4)])
        if info.step % 50 == 0 or info.step == info.total:
            rate = (time.perf_counter() - t0) / (info.step - first[0] + 1)
            masks = (
                f" sparsity {m['expected_sparsity']:.3f} (target {m['target_sparsity']:.3f})"
                if "expected_sparsity" in m
                else ""
            )
            print(
                f"[{name}] step {info.step}/{info.total} epoch {info.epoch} loss {info.loss:.4f}{masks} "
                f"({rate:.2f} s/step)",
                file=sys.stderr,
                flush=True,
            )

    trainer = Trainer(cfg, data=data, resume=True, progress=progress)
    if not trainer.is_finished():
        trainer.fit()
    return trainer, time.perf_counter() - t0


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


# -- automatic inheritance ---------------------------------------------------------------------------
def registered_config(model_args: dict) -> CLIPConfig:
    with torch.device("meta"):
        return create_model("clip_tiny", **model_args).config


def towers_of(config: CLIPConfig) -> dict:
    """Per tower: width, heads and MLP widths per layer (what pruning left)."""
    return {
        name: {"width": t.width, "heads": t.layer_heads(), "mlp_width": t.layer_mlp()}
        for name, t in (("vision", config.vision), ("text", config.text))
    }


def auto_plan(args: argparse.Namespace, total: int) -> tuple[list[float], list[int]]:
    """(kept share of the teacher's prunable parameters after each masked stage, steps of every stage, the
    fine-tune last). Default: 0.65 then clip_tiny's share; `total` split evenly over the stages."""
    final = prunable(registered_config(STUDENT)) / prunable(registered_config(TEACHER))
    keep = args.auto_keep or [0.65, final]
    if any(not 0 < k <= 1 for k in keep) or any(b > a for a, b in zip(keep, keep[1:])):
        raise SystemExit(f"--auto-keep {keep}: shares in (0, 1], non-increasing")
    steps = args.auto_steps or [total // (len(keep) + 1)] * len(keep)
    if len(steps) != len(keep) or sum(steps) >= total:
        raise SystemExit(f"--auto-steps {steps}: one per masked stage ({len(keep)}), leaving steps of {total}")
    return keep, [*steps, total - sum(steps)]


def auto_stage(args, data, teacher: Path, k: int, start: Path | None, keep: float, steps: int, total: int) -> dict:
    """Masked stage k (1-based) from `start` (None: the teacher), to `keep` of the teacher's prunable
    parameters; trains, prunes, and describes the stage."""
    t_config = registered_config(TEACHER)
    t_prunable = prunable(t_config)
    target = stage_target(t_config, clip_config_of(start) if start else t_config, 1 - keep)
    clip = {
        "context_length": args.context_length,
        "auto": True,
        "init": "auto" if start else "inherit",
        "target_sparsity": round(target, 4),
        "sparsity_warmup": round(args.auto_sparsity_warmup * steps),
        "mask_lr": args.auto_mask_lr,
        "lambda_lr": args.auto_lambda_lr,
    }
    cfg = auto_stage_cfg(args, f"auto-{k}", k - 1, teacher, start, steps, total, clip)
    trace: list = []
    trainer, seconds = run(cfg, data, f"auto-{k}", trace)
    pruned = prune_checkpoint(trainer.ckpt_path, trainer.out)
    last = read_metadata(trainer.ckpt_path)["history"][-1]
    config = clip_config_of(pruned)
    return {
        "steps": steps,
        "keep_target_of_teacher": round(keep, 4),
        "target_sparsity": clip["target_sparsity"],
        "expected_sparsity_reached": round(last["expected_sparsity"], 4),
        "params_kept": round(last["params_kept"], 4),
        "pruned_prunable_share_of_teacher": round(prunable(config) / t_prunable, 4),
        "val_top1": round(last["val_top1"], 2),
        "towers": towers_of(config),
        "sparsity_trace": trace,
        "seconds": round(seconds, 1),
        "pruned": str(pruned),
    }


def auto_stage_cfg(args, name: str, offset: int, teacher: Path, start: Path | None, steps: int, total: int, clip):
    """A stage of the auto arm: `steps` steps (the epochs only bound them), lr warm-up over the students'
    share, data order from seed + offset, the student from `start` (None: the teacher's architecture)."""
    return stage_cfg(
        args,
        name,
        task="tinyclip",
        model=None,
        img_size=None if start else 32,
        teacher=str(teacher),
        pretrained=str(start) if start else None,
        epochs=args.student_epochs,
        max_steps=steps,
        warmup_epochs=WARMUP_EPOCHS * steps / total,
        seed=args.student_seed + offset,
        clip=clip,
    )


def run_auto(args, data, teacher: Path, total: int) -> tuple[Path, dict]:
    """The progressive automatic-inheritance arm: masked stages, then the fine-tune; (its checkpoint, the
    plan and per-stage description)."""
    keep, steps = auto_plan(args, total)
    start, stages = None, []
    for k, (share, n) in enumerate(zip(keep, steps), start=1):
        stages.append(auto_stage(args, data, teacher, k, start, share, n, total))
        start = Path(stages[-1]["pruned"])
        log.info("auto stage %d: %s", k, {key: v for key, v in stages[-1].items() if key != "sparsity_trace"})
    clip = {"context_length": args.context_length, "init": "auto"}
    cfg = auto_stage_cfg(args, "auto-finetune", len(keep), teacher, start, steps[-1], total, clip)
    trainer, seconds = run(cfg, data, "auto-finetune")
    settings = {k: getattr(args, k) for k in ("auto_mask_lr", "auto_lambda_lr", "auto_sparsity_warmup")}
    info = {
        "steps": sum(steps),
        "keep": [round(k, 4) for k in keep],
        "stage_steps": steps,
        **settings,
        "stages": stages,
        "finetune_seconds": round(seconds, 1),
        "towers": towers_of(clip_config_of(trainer.ckpt_path)),
    }
    info["train_seconds_this_run"] = round(seconds + sum(s["seconds"] for s in stages), 1)
    return trainer.ckpt_path, info


# -- controls: the auto arm's architecture from a random init -----------------------------------------
def auto_arch_args(pruned: Path) -> dict:
    """`model_args` that make the registered clip_tiny the pruned model's architecture (complete tower dicts,
    per-layer heads and MLP widths included, so nothing of clip_tiny's own towers survives the merge); exits
    unless the built model's parameters equal the pruned model's, tensor by tensor."""
    model_args = clip_config_of(pruned).to_dict()
    with torch.device("meta"):
        built = create_model("clip_tiny", **model_args)
    model, _ = load_model(pruned)
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    if shapes(built) != shapes(model) or built.config != model.config:
        raise SystemExit(f"clip_tiny with model_args {model_args} is not the architecture of {pruned}")
    return model_args


def run_auto_arch_controls(args, data, teacher: Path, pruned: Path) -> dict[str, tuple[Path, float]]:
    """The auto arm's final architecture from a random init, the students' steps: contrastive
    (`auto_arch_scratch`) and affinity mimicking from the teacher (`auto_arch_affinity`); name: (checkpoint,
    seconds spent now)."""
    model_args = auto_arch_args(pruned)
    opts = {"context_length": args.context_length}
    arms = {
        "auto_arch_scratch": {"task": "clip", "clip": opts},
        "auto_arch_affinity": {"task": "tinyclip", "teacher": str(teacher), "clip": {**opts, "init": "scratch"}},
    }
    out = {}
    for name, kw in arms.items():
        cfg = stage_cfg(args, name.replace("_", "-"), model_args=model_args, epochs=args.student_epochs, **kw)
        trainer, seconds = run(cfg, data, name)
        out[name] = (trainer.ckpt_path, seconds)
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", help="CIFAR-10 image folders (default: the bundled digits)")
    p.add_argument("--out", default="runs/bench-tinyclip", help="run folders (kept: a rerun resumes or skips them)")
    p.add_argument("--teacher-epochs", type=int, default=3, help="epochs of the teacher's contrastive training")
    p.add_argument("--student-epochs", type=int, default=2, help="epochs of each student (equal steps for all)")
    p.add_argument("--batch-size", type=int, default=128, help="images (and captions) per step")
    p.add_argument("--lr", type=float, default=4e-3, help="peak lr at a batch of 512 (scaled to the batch)")
    p.add_argument("--val-per-class", type=int, default=100, help="training images per class held out for val")
    p.add_argument("--context-length", type=int, default=16, help="caption tokens (the prompts need at most 14)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order, prompts and augmentation")
    p.add_argument(
        "--student-seed",
        type=int,
        help="seed of the students only (default: --seed); another value trains them again, in folders named "
        "with it, from the same teacher and on the same validation split",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--amp", default="off", help="autocast: off | bf16 | auto (see TrainConfig.amp)")
    p.add_argument(
        "--max-steps", type=int, help="cap every stage at this many steps (to time a run; the auto arm splits it)"
    )
    p.add_argument(
        "--auto-keep",
        type=float,
        nargs="+",
        help="auto arm: kept share of the teacher's prunable (attention + MLP) parameters after each masked "
        "stage, one per stage, non-increasing (default: 0.65, then clip_tiny's share, about 0.126)",
    )
    p.add_argument(
        "--auto-steps",
        type=int,
        nargs="+",
        help="auto arm: steps of each masked stage; the fine-tune gets the rest of the students' steps "
        "(default: the students' steps split evenly over the masked stages and the fine-tune)",
    )
    p.add_argument(
        "--auto-mask-lr",
        type=float,
        default=0.12,
        help="auto arm: Adam lr of the masks' log alpha (reference 0.02 over a 1000-step sparsity warm-up; "
        "0.12 ~ 0.02 x 1000 / 170 compresses that schedule into a stage's ~170-step warm-up)",
    )
    p.add_argument(
        "--auto-lambda-lr",
        type=float,
        default=0.12,
        help="auto arm: ascent rate of the Lagrange multipliers (reference 0.02; scaled as the mask lr)",
    )
    p.add_argument(
        "--auto-sparsity-warmup",
        type=float,
        default=2 / 3,
        help="auto arm: share of a masked stage over which the target sparsity rises from 0 (reference: 1000 "
        "steps of runs many thousands long); the rest of the stage holds the target",
    )
    p.add_argument(
        "--no-auto-arch-controls",
        action="store_true",
        help="skip the two controls that train the auto arm's final architecture from a random init "
        "(contrastive, and affinity mimicking from the teacher)",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.student_seed = args.seed if args.student_seed is None else args.student_seed
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
        teacher=str(teacher.ckpt_path),
        epochs=args.student_epochs,
        clip={**opts, "init": "inherit"},
    )
    inherited, t_inherited = run(inherited_cfg, data, "inherited")
    scratch_cfg = stage_cfg(args, "scratch", task="clip", model_args=STUDENT, epochs=args.student_epochs, clip=opts)
    scratch, t_scratch = run(scratch_cfg, data, "scratch")
    auto, auto_info = run_auto(args, data, teacher.ckpt_path, scratch.total_steps)
    controls = {}
    if not args.no_auto_arch_controls:
        controls = run_auto_arch_controls(args, data, teacher.ckpt_path, Path(auto_info["stages"][-1]["pruned"]))
    results = {}
    for name, (ckpt, seconds) in {
        "teacher": (teacher.ckpt_path, t_teacher),
        "inherited": (inherited.ckpt_path, t_inherited),
        "scratch": (scratch.ckpt_path, t_scratch),
        **controls,
    }.items():
        results[name] = {**zeroshot_test(ckpt, data), "train_seconds_this_run": round(seconds, 1)}
        log.info("%s: %s", name, results[name])
    results["auto"] = {**zeroshot_test(auto, data), **auto_info}
    log.info("auto: %s", {k: v for k, v in results["auto"].items() if k != "stages"})
    top1 = {k: v["test_top1"] for k, v in results.items()}
    gaps = {f"auto_minus_{k}_top1": round(top1["auto"] - top1[k], 2) for k in controls}
    out = {
        "benchmark": "tinyclip_cifar",
        "data": data.name,
        "test_images": len(data.test),
        "prompts": "CLIP's 18 CIFAR-10 templates" if args.data_path else "vitnas's 8 digit templates",
        **results,
        "inherited_minus_scratch_top1": round(top1["inherited"] - top1["scratch"], 2),
        "auto_minus_scratch_top1": round(top1["auto"] - top1["scratch"], 2),
        "auto_minus_inherited_top1": round(top1["auto"] - top1["inherited"], 2),
        **gaps,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
