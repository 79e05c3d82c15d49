"""Speed in each precision this CPU offers, against its matmul peak. One JSON line.

The CPU's bf16 capability (`vitnas.precision`), its fp32 and bf16 matmul peaks, and for each workload
images/s and the fraction of the matching peak (2 x MACs x images/s; a training step counts 3x the
forward's MACs) in fp32, bf16 (CPU autocast), and for inference also ONNX fp32 and ONNX int8 (onnxruntime,
int8 by dynamic quantization of MatMul/Gemm, and static QDQ of MatMul/Gemm/Conv calibrated on
random inputs, same thread count). fp32 and bf16 are interleaved round by
round. Where the CPU lacks native bf16 the bf16 rows are skipped and the line says so.

Workloads: the autoformer-tiny supernet's training step (224 px, batch 8, a random subnet per step) and
the cifar one's (32 px, batch 128); the largest autoformer-tiny subnet extracted (224 px, batch 32);
search scoring on the cifar space (random archs, 1,000 images, batch 64); EfficientViT-M0 and TinyViT-5M
(224 px, batch 16).

    .venv/bin/python benchmarks/precision.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _timing import median_seconds
from search_throughput import cpu_model
from vitnas import SearchSpace, ViTSupernet, create_model
from vitnas.costs.macs import count_macs
from vitnas.data import AugmentConfig
from vitnas.data.datasets import Split
from vitnas.export import export_onnx, quantize_onnx
from vitnas.precision import cpu_bf16_capability
from vitnas.search.evaluator import SupernetEvaluator


def matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, 10, warmup=3) / 1e9


def autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None)


def train_step_fn(space: SearchSpace, img: int, batch: int, classes: int):
    """A function running `steps` training steps (new random subnet each) in a precision; images, MACs."""
    torch.manual_seed(0)
    net = ViTSupernet(space, img_size=img, num_classes=classes).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, img, img), torch.randint(0, classes, (batch,))
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(64)]
    it = iter(range(10**9))

    def run(dtype, steps):
        macs = 0
        for _ in range(steps):
            arch = archs[next(it) % len(archs)]
            net.set_active(arch)
            with autocast(dtype):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            macs += 3 * net.num_macs(arch) * batch
        return batch * steps, macs

    return run


def infer_fn(model: torch.nn.Module, x: torch.Tensor, macs_per_image: int):
    model = model.eval()

    @torch.inference_mode()
    def run(dtype, reps):
        for _ in range(reps):
            with autocast(dtype):
                model(x)
        return x.shape[0] * reps, macs_per_image * x.shape[0] * reps

    return run


def scoring_fn(n_archs: int):
    torch.manual_seed(0)
    net = ViTSupernet(SearchSpace.preset("cifar"), num_classes=10)
    split = Split(torch.arange(1000) % 10, images=torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8))
    evs = {
        dt: SupernetEvaluator(net, split, img_size=32, norm=AugmentConfig(), batch_size=64, amp_dtype=dt)
        for dt in (None, torch.bfloat16)
    }
    rng = np.random.default_rng(0)
    archs = [net.space.sample(rng) for _ in range(n_archs)]

    def run(dtype, reps):
        for arch in archs * reps:
            evs[dtype](arch)
        return 1000 * len(archs) * reps, sum(net.num_macs(a) for a in archs) * 1000 * reps

    return run


def onnx_rates(model: torch.nn.Module, x: torch.Tensor, macs_per_image: int, threads: int, reps: int) -> dict:
    import onnxruntime as ort

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "m.onnx"
        export_onnx(model.eval(), fp32, atol=1e-3)
        quantize_onnx(fp32, Path(tmp) / "m.int8d.onnx")
        calib = torch.randn(64, *x.shape[1:])  # speed only: the ranges need not fit real images
        quantize_onnx(fp32, Path(tmp) / "m.int8s.onnx", calibration=calib)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sessions = {
            name: ort.InferenceSession(str(Path(tmp) / f), opts, providers=["CPUExecutionProvider"])
            for name, f in (
                ("onnx_fp32", "m.onnx"),
                ("onnx_int8_dynamic", "m.int8d.onnx"),
                ("onnx_int8_static", "m.int8s.onnx"),
            )
        }
        feed = {"images": x.numpy()}
        times = {name: [] for name in sessions}
        for s in sessions.values():
            s.run(None, feed)
        for _ in range(reps):  # interleaved
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            ips = x.shape[0] / statistics.median(ts)
            out[name] = {"images_per_s": round(ips, 2), "gflops": round(2 * macs_per_image * ips / 1e9, 1)}
    return out


def measure(run, rounds: int, reps: int, bf16: bool) -> dict:
    dtypes = {"fp32": None} | ({"bf16": torch.bfloat16} if bf16 else {})
    for dt in dtypes.values():
        run(dt, 1)  # warm-up (and oneDNN's bf16 kernels' first-call setup)
    times: dict[str, list[float]] = {k: [] for k in dtypes}
    work: dict[str, tuple[int, int]] = {}
    for _ in range(rounds):
        for name, dt in dtypes.items():
            t = time.perf_counter()
            work[name] = run(dt, reps)
            times[name].append(time.perf_counter() - t)
    out = {}
    for name, ts in times.items():
        images, macs = work[name]
        sec = statistics.median(ts)
        out[name] = {"images_per_s": round(images / sec, 2), "gflops": round(2 * macs / sec / 1e9, 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime CPU threads")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--only", nargs="*", help="measure only the workloads whose names contain one of these")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cap = cpu_bf16_capability()
    peak32 = matmul_gflops(torch.float32)
    peak16 = matmul_gflops(torch.bfloat16) if cap else None
    q = args.quick
    tiny = SearchSpace.preset("autoformer-tiny")
    torch.manual_seed(0)
    sup = ViTSupernet(tiny, img_size=224, num_classes=1000)
    largest = sup.extract(tiny.largest()).eval()
    rows = {
        "train_tiny224_b8": (train_step_fn(tiny, 224, 8, 1000), 1 if q else 3, None),
        "train_cifar32_b128": (train_step_fn(SearchSpace.preset("cifar"), 32, 128, 10), 1 if q else 5, None),
        "infer_tiny224_largest_b32": (
            infer_fn(largest, torch.randn(32, 3, 224, 224), sup.num_macs(tiny.largest())),
            1 if q else 3,
            (largest, torch.randn(32, 3, 224, 224), sup.num_macs(tiny.largest())),
        ),
        "search_scoring_cifar": (scoring_fn(2 if q else 8), 1, None),
    }
    for name in ("efficientvit_m0", "tiny_vit_5m_224"):
        model = create_model(name).eval()
        x, macs = torch.randn(16, 3, 224, 224), count_macs(name)
        rows[f"infer_{name}_b16"] = (infer_fn(model, x, macs), 2 if q else 10, (model, x, macs))
    result = {
        "benchmark": "precision",
        "cpu": cpu_model(),
        "bf16_capability": cap or "none: bf16 rows skipped",
        "torch": torch.__version__,
        "threads": args.threads,
        "matmul_gflops_fp32": round(peak32, 1),
        "matmul_gflops_bf16": round(peak16, 1) if peak16 else None,
    }
    if args.only:
        rows = {k: v for k, v in rows.items() if any(word in k for word in args.only)}
    for name, (run, reps, onnx) in rows.items():
        r = measure(run, args.rounds, reps, bf16=cap is not None)
        if onnx is not None:
            r |= onnx_rates(*onnx, threads=args.threads, reps=3 if q else 10)
        for k, v in r.items():  # bf16 against the bf16 peak; fp32 and both ONNX rows against the fp32 one
            v["fraction_of_peak"] = round(v["gflops"] / (peak16 if k == "bf16" else peak32), 3)
        if "bf16" in r:
            r["bf16_speedup"] = round(r["bf16"]["images_per_s"] / r["fp32"]["images_per_s"], 2)
        result[name] = r
    print(json.dumps(result))


if __name__ == "__main__":
    main()
