"""Supernet training-step and inference throughput; prints one JSON line.

Training step: a random subnet per step (AutoFormer's uniform sampling), forward, cross-entropy,
backward, AdamW. Inference: the largest subnet, eval mode, no grad, both through the supernet and
as an extracted model; its efficiency is the achieved GFLOP/s (2 x analytic MACs x images/s) over
this CPU's dense fp32 matmul GFLOP/s, measured in the same run.

    python benchmarks/supernet_step.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from _timing import median_seconds
from vitnas import SearchSpace, ViTSupernet


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, reps, warmup=3) / 1e9


def train_rate(space: SearchSpace, img: int, batch: int, classes: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    net = ViTSupernet(space, img_size=img, num_classes=classes).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)
    rng = np.random.default_rng(0)
    x = torch.randn(batch, 3, img, img)
    y = torch.randint(0, classes, (batch,))
    times, macs = [], []
    for step in range(warmup + steps):
        arch = space.sample(rng)
        t = time.perf_counter()
        net.set_active(arch)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t)
            macs.append(net.num_macs(arch))
    return {
        "images_per_s": round(batch * len(times) / sum(times), 2),
        "mean_subnet_gmacs": round(float(np.mean(macs)) / 1e9, 3),
    }


@torch.inference_mode()
def infer_rate(space: SearchSpace, img: int, batch: int, classes: int, reps: int) -> dict:
    torch.manual_seed(0)
    net = ViTSupernet(space, img_size=img, num_classes=classes).eval()
    arch = space.largest()
    net.set_active(arch)
    sub = net.extract(arch).eval()
    x = torch.randn(batch, 3, img, img)
    out = {"gmacs_per_image": round(net.num_macs(arch) / 1e9, 3)}
    for name, model in (("supernet", net), ("extracted", sub)):
        out[f"{name}_images_per_s"] = round(batch / median_seconds(lambda m=model: m(x), reps, warmup=2), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps, warmup, reps = (3, 1, 2) if args.quick else (12, 3, 5)
    peak = matmul_gflops()
    tiny = SearchSpace.preset("autoformer-tiny")
    cifar = SearchSpace.preset("cifar")
    result = {
        "benchmark": "supernet_step",
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "matmul_gflops": round(peak, 1),
        "train_tiny224_b8": train_rate(tiny, 224, 8, 1000, steps, warmup),
        "train_cifar32_b128": train_rate(cifar, 32, 128, 10, steps, warmup),
        "infer_tiny224_b32": infer_rate(tiny, 224, 32, 1000, reps),
        "infer_cifar32_b256": infer_rate(cifar, 32, 256, 10, reps),
    }
    for key in ("infer_tiny224_b32", "infer_cifar32_b256"):
        r = result[key]
        gflops = 2 * r["gmacs_per_image"] * r["extracted_images_per_s"]
        r["extracted_gflops"] = round(gflops, 1)
        r["fraction_of_matmul_peak"] = round(gflops / peak, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
