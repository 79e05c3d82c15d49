"""Does the supernet rank subnets as training them alone does? One JSON line (also out/result.json).

1. Train a supernet (or reuse the one in the work folder) on a budgeted CIFAR-10.
2. Pick `--archs` archs stratified over the space's parameter range (smallest and largest included).
3. Score each with inherited weights on the validation split held out of train (what search sees).
4. Train each from scratch with one recipe; score on the test split. Two seeds of 3 archs measure
   seed noise, to compare with the spread between archs.
5. Fine-tune each briefly from its inherited weights; score on the test split.
6. Kendall tau / Spearman rho (paired-bootstrap 95% intervals): inherited vs stand-alone, fine-tuned
   vs stand-alone, and parameter count vs stand-alone (the ranking any search gets for free).

    python benchmarks/ranking.py --data ../shared/data/cifar10                 # CPU setting, <= 90 min
    python benchmarks/ranking.py --setting gpu --device cuda --out runs/bench-ranking-gpu

Every training run lives in its own folder under `--out` and a rerun skips finished ones, so a killed
run continues, and a second supernet (e.g. `--sampling sandwich`) reuses the stand-alone runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from _runs import fit, test_top1
from vitnas._io import atomic_write_text
from vitnas.data import AugmentConfig, load_data
from vitnas.models.spec import load_model
from vitnas.search.evaluator import SupernetEvaluator
from vitnas.search.ranking import rank_correlation, seed_noise, stratified_archs
from vitnas.space.presets import PRESETS
from vitnas.space.space import SearchSpace
from vitnas.train import TrainConfig

log = logging.getLogger("ranking")

# Budgets: the CPU one fits 90 minutes on 2 cores (CIFAR-10 at 16 px, patch 4: 16 tokens); the GPU one
# is the cifar space at its own 32 px on the full training split.
SETTINGS = {
    "cpu": dict(
        img_size=16, patch_size=4, train_per_class=2000, val_per_class=200, supernet_epochs=20, standalone_epochs=4
    ),
    "gpu": dict(
        img_size=32, patch_size=4, train_per_class=0, val_per_class=100, supernet_epochs=100, standalone_epochs=30
    ),
}


def build_space(out: Path, img_size: int, patch_size: int) -> Path:
    """The `cifar` space at the benchmark's resolution, written as YAML for the trainer."""
    kw = dict(PRESETS["cifar"], img_size=img_size, patch_size=patch_size, name=f"cifar-{img_size}px-p{patch_size}")
    kw["rel_pos_max"] = img_size // patch_size - 1
    path = out / "space.yaml"
    SearchSpace(**kw).to_yaml(path)
    return path


def rounded(d: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v] if isinstance(v, list) else v)
            for k, v in d.items()}  # fmt: skip


def plot(path: Path, params: np.ndarray, standalone: np.ndarray, panels: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels.items(), strict=True):
        sc = ax.scatter(x, standalone, c=params / 1e6, cmap="viridis")
        ax.set_xlabel(name)
        ax.set_ylabel("stand-alone test top-1 (%)")
    fig.colorbar(sc, ax=axes[0].tolist(), label="params (M)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu", help="budget preset (flags below override)")
    p.add_argument("--data", default="../shared/data/cifar10", help="CIFAR-10 image folders (train/, test/)")
    p.add_argument("--out", default="runs/bench-ranking", help="work folder (a rerun skips finished runs)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--img-size", type=int, help="image side the space runs at")
    p.add_argument("--patch-size", type=int, help="patch side")
    p.add_argument("--train-per-class", type=int, help="training images per class; 0 = all")
    p.add_argument("--val-per-class", type=int, help="training images per class held out to score inherited weights")
    p.add_argument("--supernet-epochs", type=int, help="supernet training epochs")
    p.add_argument("--sampling", default="uniform", choices=["uniform", "sandwich"], help="supernet subnet sampling")
    p.add_argument("--standalone-epochs", type=int, help="epochs of every stand-alone run (from scratch)")
    p.add_argument("--finetune-epochs", type=float, default=1.0, help="fine-tune length from inherited weights")
    p.add_argument("--archs", type=int, default=20, help="archs stratified over the parameter range")
    p.add_argument("--noise-archs", type=int, default=3, help="archs trained with a second seed (seed noise)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr at batch 512 (every run)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    for key, value in SETTINGS[args.setting].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    space_path = build_space(out, args.img_size, args.patch_size)
    space = SearchSpace.from_yaml(space_path)
    data = load_data(args.data, img_size=args.img_size, val_per_class=args.val_per_class, seed=0)
    if args.train_per_class > 0:
        data = data.with_train_per_class(args.train_per_class)
    log.info("%s", data.summary())
    base = dict(
        space=str(space_path), data_path=str(Path(args.data).resolve()), img_size=args.img_size, recipe="cifar",
        val_per_class=args.val_per_class, batch_size=args.batch_size, lr=args.lr, drop_path=0.0, threads=args.threads,
        ckpt_every=10**6, log_every=50,
    )  # fmt: skip
    seconds: dict[str, float] = {}

    # 1. supernet
    sup_dir = out / f"supernet-{args.sampling}-e{args.supernet_epochs}"
    sup_cfg = TrainConfig(
        **base, task="supernet", sampling=args.sampling, epochs=args.supernet_epochs, out_dir=str(sup_dir)
    )
    sup_ckpt, seconds["supernet"] = fit(sup_cfg, data, args.device)
    supernet, meta = load_model(sup_ckpt)

    # 2. archs, 3. inherited scores
    archs = stratified_archs(space, args.archs, supernet.num_params, seed=0)
    params = np.array([supernet.num_params(a) for a in archs], dtype=float)
    norm = AugmentConfig.from_dict(meta["norm"])
    inherit = SupernetEvaluator(supernet, data.val, img_size=args.img_size, norm=norm, device=args.device)
    inherit_test = SupernetEvaluator(supernet, data.test, img_size=args.img_size, norm=norm, device=args.device)
    inherited = [inherit(a) for a in archs]
    inherited_test = [inherit_test(a)["top1"] for a in archs]

    # 4. stand-alone, 5. fine-tuned
    arch_dir = out / "archs"
    arch_dir.mkdir(exist_ok=True)
    sa_base = dict(
        base, task="subnet", epochs=args.standalone_epochs, warmup_epochs=min(1.0, args.standalone_epochs / 4)
    )
    standalone, standalone_s, finetuned = [], 0.0, []
    noise_idx = [int(i) for i in np.linspace(0, len(archs) - 1, args.noise_archs)] if args.noise_archs else []
    second_seed = {}
    for i, arch in enumerate(archs):
        arch_path = arch_dir / f"{arch.key()}.yaml"
        arch.to_yaml(arch_path)
        for seed in (0, 1) if i in noise_idx else (0,):
            run = out / "standalone" / f"e{args.standalone_epochs}" / f"{arch.key()}-s{seed}"
            ckpt, s = fit(TrainConfig(**sa_base, arch=str(arch_path), seed=seed, out_dir=str(run)), data, args.device)
            standalone_s += s
            top1 = test_top1(ckpt, data, args.device)
            if seed == 0:
                standalone.append(top1)
            else:
                second_seed[i] = top1
        log.info("arch %d/%d %s: %.2fM params, inherited val %.2f, stand-alone test %.2f", i + 1, len(archs),
                 arch.key(), params[i] / 1e6, inherited[i]["top1"], standalone[-1])  # fmt: skip
    seconds["standalone"] = standalone_s
    ft_s = 0.0
    for arch in archs:
        run = sup_dir / f"finetune-e{args.finetune_epochs:g}" / arch.key()
        cfg = TrainConfig(
            **{**base, "lr": args.lr / 4}, task="subnet", arch=str(arch_dir / f"{arch.key()}.yaml"),
            init_from=str(sup_ckpt), epochs=max(1, int(np.ceil(args.finetune_epochs))),
            max_steps=max(1, int(args.finetune_epochs * len(data.train) / args.batch_size)), warmup_epochs=0.0,
            out_dir=str(run),
        )  # fmt: skip
        ckpt, s = fit(cfg, data, args.device)
        ft_s += s
        finetuned.append(test_top1(ckpt, data, args.device))
    seconds["finetune"] = ft_s

    # 6. statistics
    sa = np.array(standalone)
    inh = np.array([r["top1"] for r in inherited])
    inh_loss = np.array([r["loss"] for r in inherited])
    ft = np.array(finetuned)
    kw = dict(n_boot=args.bootstrap)
    corr = {
        "inherited_vs_standalone": rank_correlation(inh, sa, **kw),
        "inherited_neg_loss_vs_standalone": rank_correlation(-inh_loss, sa, **kw),
        "finetuned_vs_standalone": rank_correlation(ft, sa, **kw),
        "params_vs_standalone": rank_correlation(params, sa, **kw),
        "params_vs_inherited": rank_correlation(params, inh, **kw),
    }
    noise = seed_noise([standalone[i] for i in second_seed], list(second_seed.values())) if second_seed else None
    plot(out / f"ranking-{args.sampling}-e{args.supernet_epochs}.png", params, sa,
         {"inherited val top-1 (%)": inh, "fine-tuned test top-1 (%)": ft, "params (M)": params / 1e6})  # fmt: skip
    result = {
        "benchmark": "ranking",
        "setting": args.setting,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "space": space.name,
        "img_size": args.img_size,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "supernet": f"{args.sampling}, {args.supernet_epochs} epochs",
        "standalone": f"{args.standalone_epochs} epochs from scratch, seed 0",
        "finetune": f"{args.finetune_epochs:g} epoch(s) from inherited weights at lr/4",
        "archs": [a.key() for a in archs],
        "params_m": [round(x / 1e6, 3) for x in params],
        "inherited_val_top1": [round(float(x), 2) for x in inh],
        "inherited_test_top1": [round(float(x), 2) for x in inherited_test],
        "standalone_test_top1": [round(float(x), 2) for x in sa],
        "finetuned_test_top1": [round(float(x), 2) for x in ft],
        "seed_noise_sd": None if noise is None else round(noise, 3),
        "seed_pairs": {archs[i].key(): [round(standalone[i], 2), round(v, 2)] for i, v in second_seed.items()},
        "standalone_spread_sd": round(float(sa.std(ddof=1)), 3),
        **{k: rounded(v) for k, v in corr.items()},
        "minutes": {k: round(v / 60, 1) for k, v in seconds.items()}
        | {"total": round((time.perf_counter() - t0) / 60, 1)},
    }  # fmt: skip
    line = json.dumps(result)
    atomic_write_text(out / f"result-{args.sampling}-e{args.supernet_epochs}.json", line + "\n")
    print(line)


if __name__ == "__main__":
    main()
