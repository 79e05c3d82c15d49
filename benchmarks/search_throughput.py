"""Search scoring throughput: candidates per minute on the cifar space with 1,000 validation images, for
several ways of scoring, interleaved round by round (this VM drifts 10-15%). One JSON line.

Variants (each scores the same random archs of the space):
  fp32-b{B}        the evaluator as `vitnas search` runs it, batch B
  fp32-outofplace  relative-position logits built out of place (the code before in-place adds), batch 256
  bf16-b256        scoring under CPU autocast bf16 (search.amp: bf16 / auto on a CPU with native bf16)
  halving          fp32, screened on a stratified quarter, the better half finished on the rest
  bf16-halving     both
  ranks2x1         2 processes x 1 thread, each scoring half the archs (search over workers), vs 1 x 2 threads

Also the CPU's fp32 (and bf16) matmul peak and the fraction of it that scoring reaches (2 x analytic MACs x
images / time). With --checkpoint, a trained cifar supernet and its own validation split; otherwise a
randomly initialised supernet and CIFAR-10's held-out images from --data (random pixels if absent: speed
does not depend on the pixels).

    .venv/bin/python benchmarks/search_throughput.py --data ../shared/data/cifar10 [--archs 24] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _timing import median_seconds
from vitnas import SearchSpace, ViTSupernet
from vitnas.data import AugmentConfig, load_data
from vitnas.data.datasets import Split
from vitnas.nn import functional as VF
from vitnas.nn.relpos import relpos_logits
from vitnas.precision import cpu_bf16_capability
from vitnas.search.evaluator import SupernetEvaluator


def matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, 10, warmup=3) / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def setup(args: argparse.Namespace) -> tuple[ViTSupernet, Split, AugmentConfig]:
    if args.checkpoint:
        from vitnas.data import load_data_of
        from vitnas.train import load_model

        net, meta = load_model(args.checkpoint)
        return net, load_data_of(meta, source=args.checkpoint).val, AugmentConfig.from_dict(meta["norm"])
    torch.manual_seed(0)
    net = ViTSupernet(SearchSpace.preset("cifar"), num_classes=10)
    if args.data and Path(args.data).is_dir():
        val = load_data(args.data, val_per_class=args.val_images // 10, seed=0).val
    else:
        labels = torch.arange(args.val_images) % 10
        val = Split(labels, images=torch.randint(0, 256, (args.val_images, 3, 32, 32), dtype=torch.uint8))
    return net, val, AugmentConfig()


def score_all(evaluate, archs) -> float:
    t = time.perf_counter()
    for arch in archs:
        evaluate(arch)
    return time.perf_counter() - t


def halving_seconds(screen, finish, archs, keep: float = 0.5) -> float:
    t = time.perf_counter()
    rows = [{"key": a.key(), **screen(a)} for a in archs]
    best = sorted(range(len(archs)), key=lambda i: -rows[i]["top1"])[: int(np.ceil(keep * len(archs)))]
    for i in best:
        finish(archs[i])
    return time.perf_counter() - t


def _rank(rank: int, world: int, init: str, args: argparse.Namespace, archs: list, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10)
    )
    try:
        net, val, norm = setup(args)
        ev = SupernetEvaluator(net, val, img_size=32, norm=norm, batch_size=256)
        ev(archs[0])  # warm-up
        dist.barrier()
        t = time.perf_counter()
        for arch in archs[rank::world]:
            ev(arch)
        dist.barrier()
        Path(f"{out}.{rank}").write_text(str(time.perf_counter() - t))
    finally:
        dist.destroy_process_group()


def ranks_seconds(args: argparse.Namespace, archs: list, world: int = 2) -> float:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t")
        mp.start_processes(
            _rank, args=(world, os.path.join(tmp, "init"), args, archs, out), nprocs=world, start_method="spawn"
        )
        return max(float(Path(f"{out}.{r}").read_text()) for r in range(world))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10", help="CIFAR-10 image folders (random pixels if absent)")
    p.add_argument("--checkpoint", help="a trained cifar supernet (default: random initialisation)")
    p.add_argument("--val-images", type=int, default=1000, help="validation images scored per candidate")
    p.add_argument("--archs", type=int, default=24, help="random archs scored by every variant in every round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--no-ranks", action="store_true", help="skip the 2 processes x 1 thread variant")
    args = p.parse_args()
    torch.set_num_threads(2)
    net, val, norm = setup(args)
    space = net.space
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(args.archs)]
    gflop = 2 * sum(net.num_macs(a) for a in archs) * len(val) / 1e9
    kw = dict(img_size=net.img_size[0], norm=norm)
    evaluators = {f"fp32-b{b}": SupernetEvaluator(net, val, batch_size=b, **kw) for b in (64, 128, 256)}
    evaluators["bf16-b256"] = SupernetEvaluator(net, val, batch_size=256, amp_dtype=torch.bfloat16, **kw)
    screen, finish = evaluators["fp32-b256"].parts(0.25)
    screen16, finish16 = evaluators["bf16-b256"].parts(0.25)
    inplace = VF.add_relpos_logits_

    def outofplace(arch):
        VF.add_relpos_logits_ = lambda logits, q, tables, rp: logits + relpos_logits(q, tables, rp)
        try:
            return evaluators["fp32-b256"](arch)
        finally:
            VF.add_relpos_logits_ = inplace

    variants = {name: (lambda ev=ev: score_all(ev, archs)) for name, ev in evaluators.items()}
    variants["fp32-outofplace"] = lambda: score_all(outofplace, archs)
    variants["halving"] = lambda: halving_seconds(screen, finish, archs)
    variants["bf16-halving"] = lambda: halving_seconds(screen16, finish16, archs)
    if not args.no_ranks:
        variants["ranks2x1"] = lambda: ranks_seconds(args, archs)
    for ev in evaluators.values():
        ev(archs[0])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(fn())
            print(f"round {r} {name}: {60 * len(archs) / times[name][-1]:.1f} candidates/min", file=sys.stderr)
    peak32 = matmul_gflops(torch.float32)
    cap = cpu_bf16_capability()
    peak16 = matmul_gflops(torch.bfloat16)
    result = {
        "benchmark": "search_throughput",
        "cpu": cpu_model(),
        "bf16_capability": cap,
        "torch": torch.__version__,
        "threads": 2,
        "val_images": len(val),
        "archs": len(archs),
        "rounds": args.rounds,
        "supernet": args.checkpoint or "random init (cifar space)",
        "mean_subnet_mmacs": round(1e3 * gflop / 2 / len(val) / len(archs), 1),
        "matmul_gflops_fp32": round(peak32, 1),
        "matmul_gflops_bf16": round(peak16, 1),
        "fp32_peak_candidates_per_min": round(60 * peak32 / (gflop / len(archs)), 1),
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        result[f"{name}_candidates_per_min"] = round(60 * len(archs) / med, 1)
        result[f"{name}_spread"] = [round(60 * len(archs) / t, 1) for t in (max(ts), min(ts))]
        if not name.startswith(("halving", "bf16")):
            result[f"{name}_fraction_of_fp32_peak"] = round(gflop / med / peak32, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
