"""`vitnas <verb>`: thin wrappers over plain library functions."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitnas.report import summary_text, table
from vitnas.search.strategies import STRATEGIES
from vitnas.space import (
    ArchConfig,
    DartsSpace,
    MBConvArch,
    MBConvSpace,
    S3Space,
    SearchSpace,
    arch_from_yaml,
    load_space,
)

log = logging.getLogger("vitnas")


def _space_from_args(args: argparse.Namespace) -> SearchSpace | MBConvSpace:
    return load_space(args.space_yaml or args.space)


def _arch_columns(arch) -> tuple[list[str], list[str]]:
    """Table headers and cells that describe one arch of either space kind."""
    if isinstance(arch, ArchConfig):
        cells = [
            str(arch.embed_dim),
            str(arch.depth),
            f"{np.mean(arch.mlp_ratios):.2f}",
            f"{np.mean(arch.num_heads):.2f}",
        ]
        return ["embed_dim", "depth", "mean mlp", "mean heads"], cells
    return ["depths", "arch"], ["/".join(map(str, arch.depths)), arch.key()]


def cmd_space(args: argparse.Namespace) -> int:
    """Build a space's supernet, sample subnets, print their costs, run one forward and extract."""
    import torch

    from vitnas.supernet import build_supernet

    torch.manual_seed(args.seed)
    space = _space_from_args(args)
    if isinstance(space, SearchSpace):
        dims = (
            f"embed {list(space.embed_dim)}, depth {list(space.depth)}, mlp_ratio {list(space.mlp_ratio)}, "
            f"num_heads {list(space.num_heads)}"
        )
    elif isinstance(space, MBConvSpace):
        dims = f"ops (kernel, expansion) {[list(o) for o in space.ops]}, depths {[list(d) for d in space.depths]}"
    else:
        dims = ", ".join(f"{k} {list(v)}" for k, v in space.ranges().items() if k.endswith(".0"))
        dims = f"stage 0: {dims} (vitnas search-space --help; every stage in its YAML)"
    print(f"search space {space.name!r}: {space.size():.3e} archs; {dims}")
    t0 = time.perf_counter()
    net = build_supernet(space, img_size=space.img_size, num_classes=args.num_classes).eval()
    n_super = sum(p.numel() for p in net.parameters())
    print(f"supernet: {n_super / 1e6:.2f}M parameters at {space.img_size}px (built in {time.perf_counter() - t0:.1f}s)")
    rng = np.random.default_rng(args.seed)
    archs = [("smallest", space.smallest()), ("largest", space.largest())]
    archs += [(f"sample {i + 1}", space.sample(rng)) for i in range(args.samples)]
    rows = []
    for label, arch in archs:
        head, cells = _arch_columns(arch)
        rows.append([label, *cells, f"{net.num_params(arch) / 1e6:.2f}M", f"{net.num_macs(arch) / 1e9:.3f}G"])
    print(table(rows, ["subnet", *head, "params", "MACs"]))
    arch = archs[-1][1]
    x = torch.randn(2, 3, space.img_size, space.img_size)
    with torch.inference_mode(), net.active(arch):
        t0 = time.perf_counter()
        y_super = net(x)
        dt = time.perf_counter() - t0
    sub = net.extract(arch).eval()
    with torch.inference_mode():
        y_sub = sub(x)
    print(
        f"forward of {arch.key()} on a batch of 2: logits {tuple(y_super.shape)} in {dt * 1e3:.0f} ms; "
        f"extracted model agrees to {(y_super - y_sub).abs().max().item():.1e}"
    )
    return 0


def _run_pipeline(cfg, fresh: bool) -> int:
    from tqdm import tqdm

    from vitnas.pipeline import run_pipeline

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int, info: dict) -> None:
        """One bar per stage, named by the stage itself (steps for training, archs for search)."""
        bar = bars.get(stage)
        if bar is None:
            unit = "arch" if stage.startswith("search") else "step"
            bar = bars[stage] = tqdm(
                total=total, initial=done - 1, desc=stage, unit=unit, dynamic_ncols=True, disable=None
            )
        bar.update(done - bar.n)
        if info and (done % 10 == 0 or done >= total):
            bar.set_postfix(epoch=info["epoch"], loss=f"{info['loss']:.3f}")
        if done >= total:
            bar.close()

    import os

    t0 = time.perf_counter()
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 shows and prints
    s = run_pipeline(cfg, progress=progress if main_rank else None, resume=not fresh)
    for bar in bars.values():
        bar.close()
    if not main_rank:
        return 0
    print()
    print(summary_text(s))
    print(
        f"\nexported to {s['export']} (model.safetensors, arch.yaml, config.json"
        f"{', model.onnx' if cfg.onnx else ''}); plots: {', '.join(s['plots'])}"
    )
    print(f"done in {time.perf_counter() - t0:.0f}s; summary: {Path(cfg.out_dir) / 'summary.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from vitnas.pipeline import PipelineConfig

    cfg = PipelineConfig.from_yaml(Path(str(files("vitnas") / "configs" / "demo.yaml")))
    if args.out_dir:
        cfg.out_dir = args.out_dir
    return _run_pipeline(cfg, args.fresh)


def cmd_search(args: argparse.Namespace) -> int:
    from vitnas.pipeline import PipelineConfig

    cfg = PipelineConfig.from_yaml(args.config)
    if args.out_dir:
        cfg.out_dir = args.out_dir
    if args.checkpoint:
        cfg.checkpoint = args.checkpoint
    if args.strategy:
        cfg.search = {**cfg.search, "strategy": args.strategy}
    return _run_pipeline(cfg, args.fresh)


def cmd_search_space(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vitnas.pipeline.space_search import SpaceSearchConfig, run_space_search

    cfg = SpaceSearchConfig.from_yaml(args.config, out_dir=args.out_dir, iterations=args.iterations)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars.clear()
            bars[stage] = tqdm(total=total, desc=f"search-space {stage}", dynamic_ncols=True, disable=None)
        bars[stage].total = total
        bars[stage].update(done - bars[stage].n)

    summary = run_space_search(cfg, progress)
    for bar in bars.values():
        bar.close()
    for it in summary["iterations"]:
        e = it["errors"]
        ranges = ", ".join(f"{k} {v}" for k, v in it["ranges"].items())
        print(f"iteration {it['iteration']}: E {e['E']:.2f}  T {e['T']:.2f}  E-T {e['ET']:.2f}  | {ranges}")
    print(f"final space: {summary['final_space']} (plots: et_error.png, ranges.png next to it)")
    return 0


def _arch_in_space(path: str, space: SearchSpace | MBConvSpace) -> ArchConfig | MBConvArch:
    """The arch YAML at `path`, which must lie in `space` (the error names dimension, value, choices)."""
    return arch_from_yaml(space, path)


def cmd_export(args: argparse.Namespace) -> int:
    from vitnas.export import export_subnet, model_name
    from vitnas.models.spec import is_supernet, load_model

    model, meta = load_model(args.checkpoint)
    kind = meta["model"]["kind"]
    if is_supernet(kind):
        if not args.arch:
            raise ValueError(f"{args.checkpoint} holds a supernet: pass --arch (e.g. a search's best.yaml)")
        model = model.extract(_arch_in_space(args.arch, model.space))
    elif args.arch and (kind != "vit" or ArchConfig.from_yaml(args.arch) != model.arch):
        raise ValueError(f"{args.checkpoint} holds {model_name(model)}, not the arch in {args.arch}")
    if args.int8 and not args.onnx:
        raise ValueError("--int8 quantizes the ONNX model: pass --onnx too")
    extra = {"source": str(args.checkpoint), "classes": meta.get("classes"), "norm": meta.get("norm")}
    folder = export_subnet(model, args.out, extra=extra, onnx=args.onnx)
    print(f"exported {model_name(model)} to {folder}")
    if args.int8:
        _export_int8(folder, meta, args)
    return 0


def _normalized(split, img_size: int, norm, limit: int | None = None, seed: int = 0):
    """A split's images as one normalized tensor (evaluation transform), with labels; a seeded `limit`."""
    import torch

    from vitnas.data.augment import eval_transform

    if limit is not None and limit < len(split):
        split = split.subset(np.sort(np.random.default_rng([seed, 127]).choice(len(split), limit, replace=False)))
    xs, ys = zip(*((eval_transform(x, img_size, norm), y) for x, y in split.sequential(256)), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _export_int8(folder: Path, meta: dict, args: argparse.Namespace) -> None:
    """model.int8.onnx beside model.onnx, calibrated on training images; both scored on the held-out split."""
    import json

    from vitnas._io import atomic_write_text
    from vitnas.data import AugmentConfig, load_data_of
    from vitnas.export import onnx_scores, quantize_onnx

    data = load_data_of(meta, data_path=args.data_path, source=str(args.checkpoint))
    img, norm = meta["img_size"], AugmentConfig.from_dict(meta["norm"])
    calib = None if args.int8_dynamic else _normalized(data.train, img, norm, args.calibration)[0]
    mode = quantize_onnx(folder / "model.onnx", folder / "model.int8.onnx", calib)
    x, y = _normalized(data.val, img, norm)
    fp32, int8 = onnx_scores(folder / "model.onnx", x, y), onnx_scores(folder / "model.int8.onnx", x, y)
    report = {"mode": mode, "val_images": len(y), "calibration_images": 0 if calib is None else len(calib)}
    report |= {f"{k}_{name}": round(v, 2) for name, r in (("fp32", fp32), ("int8", int8)) for k, v in r.items()}
    cfg_path = folder / "config.json"
    atomic_write_text(cfg_path, json.dumps({**json.loads(cfg_path.read_text()), "onnx_int8": report}, indent=1))
    print(
        f"model.int8.onnx ({mode} int8): held-out top-1 {int8['top1']:.2f}% vs fp32 {fp32['top1']:.2f}% on {len(y)} "
        f"images; {int8['images_per_s']:.0f} vs {fp32['images_per_s']:.0f} images/s (onnxruntime, CPU)"
    )


def cmd_models(args: argparse.Namespace) -> int:
    """Registered models with their parameter counts (and MACs with --macs, which runs each model once)."""
    import torch

    from vitnas.costs.macs import count_macs
    from vitnas.models import create_model, list_models
    from vitnas.models.clip import CLIP

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no registered model matches {args.pattern!r}; `vitnas models` lists them all")
    rows = []
    for name in names:
        with torch.device("meta"):
            model = create_model(name)
            clip = isinstance(model, CLIP)  # no classifier to size, and a forward needs text too
            if not clip:
                model = create_model(name, num_classes=args.num_classes)
        row = [name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}"]
        if args.macs:
            row.append("-" if clip else f"{count_macs(name, num_classes=args.num_classes) / 1e6:.0f}")
        rows.append(row)
    print(table(rows, ["model", "params (M)"] + (["MACs (M)"] if args.macs else [])))
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    """Parameters and MACs of an arch YAML (ours or AutoFormer's RETRAIN section), counted analytically."""
    import torch

    from vitnas.supernet import build_supernet

    space = _space_from_args(args)
    arch = _arch_in_space(args.arch, space)
    with torch.device("meta"):  # nothing allocated: the counts are arithmetic
        net = build_supernet(space, img_size=args.img_size or space.img_size, num_classes=args.num_classes)
    print(f"{arch.key()}: {net.num_params(arch):,} parameters, {net.num_macs(arch) / 1e9:.3f} GMACs")
    return 0


def _add_dataclass_flags(p: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the config dataclass `cls` (`--batch-size 64`, `--no-inplace-distill`,
    `--augment mixup=0`), its help from the field's comment; a comment starting "required" makes the flag required."""
    import dataclasses

    from vitnas._config import field_help

    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, text = str(f.type), helps[f.name].replace("%", "%%")
        required = text.startswith("required")
        if kind.startswith("dict"):
            p.add_argument(flag, action="append", metavar="KEY=VALUE", help=f"{text}; repeat the flag per key")
        elif kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            p.add_argument(flag, type=conv, default=None, metavar=f.name.upper(), help=text, required=required)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from vitnas.train.config import TrainConfig

    p.add_argument("--config", help="training config YAML; flags override its values")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.safetensors if present")
    _add_dataclass_flags(p, TrainConfig, skip=("task",))


def _key_values(items: list[str], key: str) -> dict:
    """Repeated `--flag KEY=VALUE` items as a mapping, each VALUE read as YAML (numbers, lists, ...)."""
    import yaml

    pairs = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--{key.replace('_', '-')} expects KEY=VALUE, got {item!r}")
        pairs[name] = yaml.safe_load(raw)
    return pairs


def _train_config(args: argparse.Namespace, task: str):
    from vitnas.train.config import TrainConfig

    overrides = {}
    for key in TrainConfig.__dataclass_fields__:
        value = getattr(args, key, None)
        if value is None:
            continue
        overrides[key] = _key_values(value, key) if isinstance(value, list) else value
    overrides["task"] = task
    if args.config:
        return TrainConfig.from_yaml(args.config, **overrides)
    return TrainConfig.from_dict(overrides, source="command line")


def _run_training(args: argparse.Namespace, task: str, cfg=None) -> int:
    """Train what the flags (or `cfg`, a TrainConfig built from them) say, with a progress bar."""
    from tqdm import tqdm

    from vitnas.train import Trainer

    cfg = cfg or _train_config(args, task)
    bar = None

    def progress(info) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=info.total,
                initial=info.step - 1,
                desc=f"train {task}",
                unit="step",
                dynamic_ncols=True,
                disable=None,
            )
        bar.update(info.step - bar.n)
        if info.step % 10 == 0 or info.step == info.total:
            bar.set_postfix(
                epoch=info.epoch, loss=f"{info.loss:.3f}", lr=f"{info.lr:.1e}", img_s=f"{info.images_per_s:.0f}"
            )

    trainer = Trainer(cfg, resume=args.resume, progress=progress)
    if trainer.dist.is_main:
        print(trainer.data.summary())
        print(
            f"{task}: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M parameters, "
            f"{trainer.total_steps} steps, peak lr {trainer.base_lr:.3g} (= lr {cfg.lr:g} x global batch "
            f"{cfg.batch_size * trainer.dist.world} / 512), writing to {cfg.out_dir}"
        )
    result = trainer.fit()
    if bar is not None:
        bar.close()
    if trainer.dist.is_main:
        last = result["history"][-1] if result["history"] else {}
        print("final: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items()))
        print(f"checkpoint: {result['checkpoint']}")
    return 0


def cmd_train_supernet(args: argparse.Namespace) -> int:
    return _run_training(args, args.method)


def cmd_retrain(args: argparse.Namespace) -> int:
    return _run_training(args, "subnet")


def cmd_save_logits(args: argparse.Namespace) -> int:
    import dataclasses

    from tqdm import tqdm

    from vitnas.train.save_logits import SaveLogitsConfig, save_logits

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SaveLogitsConfig)}
    values["augment"] = _key_values(values["augment"] or [], "augment")
    cfg = SaveLogitsConfig(**{k: v for k, v in values.items() if v is not None})
    bar = tqdm(desc="save-logits", unit="chunk", dynamic_ncols=True, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    result = save_logits(cfg, device=args.device, progress=progress)
    bar.close()
    m = result["manifest"]
    print(
        f"{result['store']}: {m['epochs']} epochs x {m['num_samples']} images, top-{m['topk']} of "
        f"{m['num_classes']} classes, {m['record_bytes']} bytes per record; {result['chunks_written']} chunks "
        f"written by this run"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vitnas.data import AugmentConfig, load_data_of
    from vitnas.evaluation import evaluate
    from vitnas.export import model_name
    from vitnas.models.spec import is_supernet, load_model

    model, meta = load_model(args.checkpoint, use_ema=args.ema)
    data = load_data_of(meta, data_path=args.data_path, source=str(args.checkpoint))
    norm = AugmentConfig.from_dict(meta["norm"])
    split = getattr(data, args.split)
    if is_supernet(meta["model"]["kind"]):
        archs = (
            [("arch", _arch_in_space(args.arch, model.space))]
            if args.arch
            else [("largest", model.space.largest()), ("smallest", model.space.smallest())]
        )
    else:
        archs = [("model", None)]
    rows = []
    for name, arch in archs:
        r = evaluate(model, split, img_size=meta["img_size"], norm=norm, arch=arch, batch_size=args.batch_size)
        rows.append(
            [
                name,
                (arch.key() if arch else model_name(model))[:60],
                f"{r['top1']:.2f}",
                f"{r['loss']:.4f}",
                str(r["n"]),
            ]
        )
    print(f"{args.checkpoint} on the {args.split} split of {data.name}:")
    print(table(rows, ["subnet", "arch", "top1 %", "loss", "images"]))
    return 0


def cmd_train_clip(args: argparse.Namespace) -> int:
    from vitnas.train.tasks.clip import ClipConfig, prune_checkpoint

    if args.progressive:
        return _train_clip_progressive(args)
    cfg = _train_config(args, args.method)
    code = _run_training(args, args.method, cfg)
    if code == 0 and args.method == "tinyclip" and ClipConfig.from_dict(cfg.clip).auto:
        out = prune_checkpoint(Path(cfg.out_dir) / "last.safetensors", cfg.out_dir)
        print(
            f"pruned student: {out} (evaluate it with `vitnas evaluate-zeroshot`, or start the next stage from it "
            "with --pretrained)"
        )
    return code


def _train_clip_progressive(args: argparse.Namespace) -> int:
    """TinyCLIP's progressive automatic inheritance: one masked tinyclip stage per sparsity of --progressive
    (shares of the teacher's prunable parameters), each in OUT_DIR/stage<k>, pruned, and the next stage started
    from its pruned.safetensors with a target relative to that model. A rerun with --resume continues the stage
    it stopped in and passes over finished ones."""
    import dataclasses

    from vitnas.train.tasks.clip import ClipConfig, clip_config_of, prune_checkpoint, stage_target

    cfg = _train_config(args, "tinyclip")
    sparsities = list(args.progressive)
    if args.method != "tinyclip" or cfg.model or not cfg.teacher:
        raise ValueError(
            "--progressive needs --method tinyclip and --teacher; the first stage's student is the teacher itself "
            "(or --pretrained), not --model"
        )
    if any(not 0 < x < 1 for x in sparsities) or any(b <= a for a, b in zip(sparsities, sparsities[1:])):
        raise ValueError(f"--progressive {sparsities}: sparsities of the teacher must rise within (0, 1)")
    towers = ClipConfig.from_dict(cfg.clip).mask_towers()
    teacher = clip_config_of(cfg.teacher)  # the architecture only: each stage's trainer loads the weights
    start = cfg.pretrained
    for k, sparsity in enumerate(sparsities, start=1):
        start_config = clip_config_of(start) if start else teacher
        target = stage_target(teacher, start_config, sparsity, towers)
        out = Path(cfg.out_dir) / f"stage{k}"
        print(f"stage {k}/{len(sparsities)}: to sparsity {sparsity} of the teacher = {target:.4f} of {start or 'it'}")
        clip = {**cfg.clip, "auto": True, "target_sparsity": round(target, 6)}
        stage = dataclasses.replace(cfg, out_dir=str(out), pretrained=start, clip=clip)
        code = _run_training(args, "tinyclip", stage)
        if code:
            return code
        start = str(prune_checkpoint(out / "last.safetensors", out))
    print(f"pruned student of the last stage: {start} (fine-tune it with --pretrained, or evaluate-zeroshot it)")
    return 0


def _checkpoint_zeroshot_data(args: argparse.Namespace, meta: dict):
    """The images a checkpoint is scored on: --data-path (any class folder: zero-shot needs no training on its
    classes), else the data it was validated on (eval_data of a run trained on CSV pairs or shards), with its
    train / val split."""
    from vitnas.data import load_data, load_data_of
    from vitnas.data.image_text import is_pairs

    cfg = meta["config"]
    path = args.data_path
    if path is None and is_pairs(cfg.get("data_path")):
        path = (cfg.get("clip") or {}).get("eval_data")
        if path is None:
            raise ValueError(f"{args.checkpoint}: trained on image-caption pairs without eval_data; pass --data-path")
        path = None if path == "digits" else path
    elif path is None:
        return load_data_of(meta, source=str(args.checkpoint))
    return load_data(path, img_size=meta["img_size"], val_per_class=cfg["val_per_class"], seed=cfg["seed"])


def _zeroshot_setup(args: argparse.Namespace):
    """(CLIP model, class-labelled data, class names, templates, context length) for a vitnas checkpoint (its
    data, prompts and caption length by default) or a CLIP weights file / registered model (--data-path)."""
    from vitnas.checkpoint import read_metadata
    from vitnas.data import load_data
    from vitnas.models.spec import load_model
    from vitnas.train.tasks.clip import TEMPLATE_SETS, class_prompts, load_clip

    meta = None
    if not args.model and Path(args.checkpoint).suffix == ".safetensors":
        try:
            meta = read_metadata(args.checkpoint)
        except ValueError:
            meta = None  # plain open_clip-layout weights
    names, templates, context = None, (), None
    if meta is not None:
        model, meta = load_model(args.checkpoint)
        data = _checkpoint_zeroshot_data(args, meta)
        saved = meta.get("clip", {})
        if data.classes == meta.get("classes"):  # the classes it was validated on: its own prompts
            names, templates = saved.get("classnames"), tuple(saved.get("templates", ()))
        context = saved.get("context_length")
    else:
        model, _ = load_clip(args.model or args.checkpoint, args.checkpoint if args.model else None)
        data = load_data(args.data_path, img_size=model.config.vision.image_size)
    if not names or args.templates != "auto" or not templates:
        digits = data.name == "digits" and data.classes == [str(i) for i in range(10)]
        names, auto = class_prompts(data.classes, digits=digits)
        templates = auto if args.templates == "auto" else TEMPLATE_SETS[args.templates]
    context = args.context_length or context or model.config.text.context_length
    return model, data, list(names), templates, context


def cmd_evaluate_zeroshot(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vitnas.data.tokenizer import tokenize
    from vitnas.models.clip import CLIP, CLIP_MEAN, CLIP_STD
    from vitnas.zeroshot import evaluate_zeroshot, zeroshot_classifier

    model, data, names, templates, context = _zeroshot_setup(args)
    if not isinstance(model, CLIP):
        raise ValueError(f"{args.checkpoint}: holds a {type(model).__name__}, not a CLIP (use `vitnas evaluate`)")
    model = model.to(args.device)
    classifier = zeroshot_classifier(model, names, templates, lambda t: tokenize(t, context), args.device)
    split = getattr(data, args.split)
    total = -(-len(split) // args.batch_size)
    batches = tqdm(split.sequential(args.batch_size), total=total, desc="zero-shot", unit="batch", disable=None)
    r = evaluate_zeroshot(
        model,
        batches,
        classifier,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        img_size=model.config.vision.image_size,
        device=args.device,
    )
    print(
        f"{args.checkpoint} on the {args.split} split of {data.name} ({len(names)} classes, {len(templates)} "
        f"prompts each):"
    )
    print(table([[f"{r['top1']:.2f}", f"{r['top5']:.2f}", str(r["n"])]], ["top1 %", "top5 %", "images"]))
    return 0


def cmd_prune_clip(args: argparse.Namespace) -> int:
    from vitnas.checkpoint import read_metadata
    from vitnas.train.tasks.clip import prune_checkpoint

    out = prune_checkpoint(args.checkpoint, args.out)
    info = read_metadata(out)["pruned"]
    print(
        f"{out}: {info['params_before'] / 1e6:.2f}M -> {info['params_after'] / 1e6:.2f}M parameters "
        f"({100 * (1 - info['params_after'] / info['params_before']):.1f}% fewer)"
    )
    return 0


def _add_clip_parsers(sub: argparse._SubParsersAction) -> None:
    """The CLIP verbs: train-clip, evaluate-zeroshot, prune-clip."""
    tc = sub.add_parser(
        "train-clip",
        help="train a CLIP on prompt captions of class-labelled images (--method clip), or distil one into a "
        "smaller CLIP by affinity mimicking (--method tinyclip, TinyCLIP)",
    )
    tc.add_argument(
        "--method",
        choices=("clip", "tinyclip"),
        default="clip",
        help="clip: contrastive training of --model from scratch; tinyclip: a --teacher CLIP's affinities "
        "distilled into --model (weights inherited from the teacher by default), or into the masked teacher "
        "with --clip auto=true, whose pruned result is written to OUT_DIR/pruned.safetensors. Settings with "
        "--clip KEY=VALUE (ClipConfig: templates, context_length, logit_scale, alpha, init, auto, ...)",
    )
    tc.add_argument(
        "--progressive",
        type=float,
        nargs="+",
        metavar="SPARSITY",
        help="tinyclip automatic inheritance in progressive stages: the share of the teacher's prunable "
        "parameters removed after each stage, rising (TinyCLIP's scripts: 0.25 0.5 0.75). Each stage trains for "
        "--epochs in OUT_DIR/stage<k> from the previous stage's pruned model (the first: the teacher) and is "
        "pruned to OUT_DIR/stage<k>/pruned.safetensors",
    )
    _add_config_flags(tc)
    tc.set_defaults(func=cmd_train_clip)

    zs = sub.add_parser("evaluate-zeroshot", help="zero-shot top-1 / top-5 of a CLIP on class-labelled images")
    zs.add_argument(
        "checkpoint",
        help="a clip / tinyclip / prune-clip checkpoint, an open_clip or TinyCLIP weights file, or weights for --model",
    )
    zs.add_argument("--model", help="a registered CLIP (`vitnas models '*clip*'`) that CHECKPOINT holds weights for")
    zs.add_argument("--data-path", help="image-class folder (default: the checkpoint's data, else the bundled digits)")
    zs.add_argument(
        "--split", default="val", choices=["val", "test"], help="held-out validation images or the test split"
    )
    zs.add_argument(
        "--templates",
        default="auto",
        choices=["auto", "cifar10", "digits", "imagenet"],
        help="prompt templates (default: the checkpoint's training prompts, else the digits' or CIFAR-10's)",
    )
    zs.add_argument("--context-length", type=int, help="tokens per prompt (default: the checkpoint's, else 77)")
    zs.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default: 256)")
    zs.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    zs.set_defaults(func=cmd_evaluate_zeroshot)

    pc = sub.add_parser(
        "prune-clip",
        help="prune the masked student of a tinyclip run with --clip auto=true into a plain, smaller CLIP checkpoint",
    )
    pc.add_argument("checkpoint", help="the tinyclip run's checkpoint (OUT_DIR/last.safetensors)")
    pc.add_argument("--out", required=True, help="folder for pruned.safetensors (the next stage's --pretrained)")
    pc.set_defaults(func=cmd_prune_clip)


def _save_logits_config() -> type:
    from vitnas.train.save_logits import SaveLogitsConfig

    return SaveLogitsConfig


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export a subnet (model.safetensors, arch.yaml, config.json, ONNX)")
    export.add_argument("checkpoint", help="a supernet checkpoint (with --arch) or a subnet checkpoint")
    export.add_argument("--arch", help="arch YAML, e.g. OUT/search/evolution/best.yaml")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--onnx", action="store_true", help="also write model.onnx, checked with onnxruntime")
    export.add_argument(
        "--int8",
        action="store_true",
        help="with --onnx: also write model.int8.onnx (onnxruntime quantization, calibrated on training images) "
        "and report held-out top-1 and speed of both",
    )
    export.add_argument(
        "--int8-dynamic", action="store_true", help="quantize activations at run time instead of calibrating"
    )
    export.add_argument(
        "--calibration", type=int, default=256, help="training images that calibrate static int8 (default: 256)"
    )
    export.add_argument("--data-path", help="the checkpoint's data, if not at its recorded data_path (for --int8)")
    export.set_defaults(func=cmd_export)


def _add_training_parsers(sub: argparse._SubParsersAction) -> None:
    """The verbs that train: search-space, train-supernet, models, retrain, save-logits."""
    ss = sub.add_parser(
        "search-space",
        help="search the search space (S3): train a supernet per space, measure its E-T error, move the ranges",
    )
    ss.add_argument("--config", required=True, help="search-space YAML (SpaceSearchConfig fields)")
    ss.add_argument("--out-dir", help="iteration folders and plots (default: the config's out_dir)")
    ss.add_argument("--iterations", type=int, help="spaces to measure (default: the config's iterations)")
    ss.set_defaults(func=cmd_search_space)

    ts = sub.add_parser("train-supernet", help="train a weight-sharing supernet")
    ts.add_argument(
        "--method",
        choices=("supernet", "cream", "darts", "cdarts"),
        default="supernet",
        help="supernet: one uniformly sampled path per step (AutoFormer / SPOS, or --sampling sandwich); cream: "
        "prioritized paths distilled by meta-matching (Cream; settings with --cream KEY=VALUE); darts / cdarts: "
        "gradient-based cell search on a DARTS space (first-order DARTS / CDARTS; settings with --darts KEY=VALUE)",
    )
    _add_config_flags(ts)
    ts.set_defaults(func=cmd_train_supernet)
    md = sub.add_parser("models", help="list the registered models (for retrain --model) and their sizes")
    md.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'efficientvit*'")
    md.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000)")
    md.add_argument("--macs", action="store_true", help="also count MACs at the model's input size")
    md.set_defaults(func=cmd_models)
    rt = sub.add_parser(
        "retrain",
        help="train one subnet (--arch) or registered model (--model) from scratch, or fine-tune a subnet "
        "from a supernet (--init-from)",
    )
    _add_config_flags(rt)
    rt.set_defaults(func=cmd_retrain)

    sl = sub.add_parser(
        "save-logits",
        help="run a teacher once over the augmented training split and store its top-K probabilities "
        "(TinyViT), for retrain --distill-logits",
    )
    _add_dataclass_flags(sl, _save_logits_config())
    sl.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    sl.set_defaults(func=cmd_save_logits)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitnas", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_space_args(p: argparse.ArgumentParser, default: str) -> None:
        presets = SearchSpace.presets() + MBConvSpace.presets() + S3Space.presets() + DartsSpace.presets()
        p.add_argument(
            "--space",
            default=default,
            choices=presets,
            help="search space preset (ViT, Cream MBConv, S3 or DARTS cells)",
        )
        p.add_argument("--space-yaml", help="search space YAML (ours, either kind, or AutoFormer's); overrides --space")
        p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000)")

    demo = sub.add_parser("demo", help="the whole pipeline on the embedded digits (train, search, export, report)")
    demo.add_argument("--out-dir", help="default: runs/demo")
    demo.add_argument("--fresh", action="store_true", help="start over instead of continuing a previous run")
    demo.set_defaults(func=cmd_demo)

    search = sub.add_parser("search", help="train a supernet (or load one), search, export, fine-tune, report")
    search.add_argument("--config", required=True, help="pipeline YAML (see src/vitnas/configs/demo.yaml)")
    search.add_argument("--out-dir", help="where every stage writes (default: the config's out_dir)")
    search.add_argument("--checkpoint", help="a trained supernet checkpoint (skips training)")
    search.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        help="overrides search.strategy; darts / cdarts train with that task on a DARTS space and export the "
        "genotype its architecture weights derive",
    )
    search.add_argument("--fresh", action="store_true", help="start over instead of continuing a previous run")
    search.set_defaults(func=cmd_search)

    _add_export_parser(sub)

    space = sub.add_parser("space", help="a space's supernet: sample subnets, show their costs, run a forward")
    add_space_args(space, "autoformer-tiny")
    space.add_argument("--samples", type=int, default=5, help="random subnets to show (default: 5)")
    space.add_argument("--seed", type=int, default=0, help="seed of the sampled subnets and weights (default: 0)")
    space.set_defaults(func=cmd_space)

    costs = sub.add_parser("costs", help="parameters and MACs of an arch YAML")
    add_space_args(costs, "autoformer-tiny")
    costs.add_argument("arch", help="arch YAML (ours, or an AutoFormer subnet config)")
    costs.add_argument("--img-size", type=int, help="input resolution (default: the space's img_size)")
    costs.set_defaults(func=cmd_costs)

    _add_training_parsers(sub)
    _add_clip_parsers(sub)
    ev = sub.add_parser("evaluate", help="top-1 and loss of a checkpoint on the validation or test split")
    ev.add_argument("checkpoint", help="a training checkpoint (last.safetensors)")
    ev.add_argument(
        "--split", default="val", choices=["val", "test"], help="held-out validation images or the test split"
    )
    ev.add_argument("--arch", help="supernet checkpoints: evaluate this arch YAML (default: largest and smallest)")
    ev.add_argument("--data-path", help="default: the data the checkpoint was trained on")
    ev.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default: 256)")
    ev.add_argument("--ema", action="store_true", help="use the EMA weights")
    ev.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from vitnas.train import TrainingDiverged

        if isinstance(err, TrainingDiverged):
            print(f"error: {err}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
