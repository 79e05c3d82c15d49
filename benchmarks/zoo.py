"""Images/s of registered models at 224px, 1 thread, batch 16 (EfficientViT's CPU protocol), eager and
through ONNX Runtime; models with `fuse()` (EfficientViT, TinyViT, Cream) also fused. One JSON line.

    python benchmarks/zoo.py [--models 'efficientvit_*,deit_tiny*'] [--threads 1] [--batch 16]
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import vitnas
from _timing import median_seconds


def rate(fn, batch: int, reps: int) -> float:
    return round(batch / median_seconds(fn, reps), 1)


def onnx_rate(model: torch.nn.Module, x: torch.Tensor, reps: int, threads: int) -> float:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = str(Path(tmp) / "m.onnx")
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy()}
        want = model(x).detach().numpy()
        got = session.run(None, feed)[0]
        assert np.abs(got - want).max() < 1e-3, "ONNX output differs"
        return rate(lambda: session.run(None, feed), x.shape[0], reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--models",
        default="efficientvit_*,tiny_vit_*_224,deit_tiny_patch16_224,autoformer_tiny,mini_deit_tiny*,mini_deit_small*,"
        "s3_tiny,cream_14,cream_287",
        help="comma-separated shell patterns over the registry",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in vitnas.list_models() if any(fnmatch.fnmatch(n, pat) for pat in args.models.split(","))]
    x = torch.randn(args.batch, 3, 224, 224)
    out: dict = {"benchmark": "zoo", "threads": args.threads, "batch": args.batch, "torch": torch.__version__}
    with torch.inference_mode():
        for name in names:
            model = vitnas.create_model(name).eval()
            row = {
                "params_m": round(sum(q.numel() for q in model.parameters()) / 1e6, 2),
                "eager": rate(lambda m=model: m(x), args.batch, args.reps),
            }
            if hasattr(model, "fuse"):
                fused = copy.deepcopy(model).fuse()
                row["eager_fused"] = rate(lambda m=fused: m(x), args.batch, args.reps)
                model = fused
            out[name] = row
    for name in names:  # ONNX export needs autograd-free tracing outside inference mode
        model = vitnas.create_model(name).eval()
        if hasattr(model, "fuse"):
            model = model.fuse()
        with torch.no_grad():
            out[name]["onnxruntime"] = onnx_rate(model, x, args.reps, args.threads)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
