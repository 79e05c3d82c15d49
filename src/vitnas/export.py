"""Export a subnet as a standalone folder: `model.safetensors`, `arch.yaml`, `config.json` (+ ONNX).

`config.json` holds the model spec (`vitnas.models.spec`) under "spec", beside what the caller adds
(classes, normalization, search results). Registry models (`vitnas.create_model`) export the same way,
with no arch.yaml. `load_subnet(folder)` rebuilds the model with no supernet code, from today's folders
and from those written before the spec existed; the ONNX file is checked against onnxruntime.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitnas._io import atomic_save_safetensors, atomic_write_text, corrupt_file_error
from vitnas.costs.macs import model_input_size
from vitnas.models.spec import build, export_spec, is_supernet, spec_of
from vitnas.models.vit import VisionTransformer

__all__ = ["export_onnx", "export_subnet", "load_subnet", "onnx_scores", "quantize_onnx"]

log = logging.getLogger(__name__)


def model_name(model: nn.Module) -> str:
    """A short name for messages: the arch key of a ViT, else the registered name."""
    if isinstance(model, VisionTransformer):
        return model.arch.key()
    spec = getattr(model, "registry_spec", None)
    return spec["name"] if spec else type(model).__name__


def export_subnet(
    model: nn.Module,
    folder: str | Path,
    *,
    extra: dict[str, Any] | None = None,
    onnx: bool = False,
    onnx_atol: float = 1e-4,
) -> Path:
    """Write a ViT subnet, or a model made by `vitnas.create_model`, as a folder `load_subnet` reads."""
    spec = spec_of(model)
    if is_supernet(spec["kind"]):
        raise TypeError("cannot export a supernet: extract a subnet first (supernet.extract(arch))")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model.state_dict(), folder / "model.safetensors", metadata={"format": "vitnas-vit-1"})
    arch = getattr(model, "arch", None)  # a ViT subnet's ArchConfig, a DARTS network's Genotype
    if arch is not None and hasattr(arch, "to_yaml"):
        arch.to_yaml(folder / "arch.yaml")
    atomic_write_text(folder / "config.json", json.dumps({"spec": spec, **(extra or {})}, indent=1))
    if onnx:
        export_onnx(model, folder / "model.onnx", atol=onnx_atol)
    log.info("exported %s to %s", model_name(model), folder)
    return folder


def load_subnet(folder: str | Path) -> nn.Module:
    """The exported model, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (not an exported vitnas subnet folder)")
    spec = export_spec(json.loads(cfg_path.read_text()), source=str(cfg_path))
    model = build(spec, meta_device=True, source=str(cfg_path))
    weights_path = folder / "model.safetensors"
    try:
        weights = load_file(weights_path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{weights_path}: missing (the folder's config.json has no weights beside it)"
        ) from None
    except Exception as err:
        raise corrupt_file_error(weights_path, err) from None
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_path}: does not match {cfg_path}: {err}") from None
    return model.eval()


def export_onnx(model: nn.Module, path: str | Path, *, batch: int = 2, atol: float = 1e-4) -> float:
    """Write ONNX (dynamic batch) and check it against onnxruntime; returns the max abs difference."""
    import numpy as np
    import onnxruntime as ort

    path = Path(path)
    model = model.eval()
    c, h, w = model_input_size(model)
    x = torch.randn(batch, c, h, w)
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():  # shapes are static per model: the tracer's constant-folding notes are moot
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (x,),
            str(tmp),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    x2 = torch.randn(batch + 1, c, h, w)
    with torch.no_grad():
        want = model(x2).numpy()
    got = session.run(None, {"images": x2.numpy()})[0]
    diff = float(np.abs(got - want).max())
    if diff > atol:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ONNX export of {model_name(model)} differs from PyTorch by {diff:.2e} (> {atol:g})")
    tmp.replace(path)
    log.info("wrote %s (onnxruntime max abs diff %.1e)", path, diff)
    return diff


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a normalized image tensor, in batches."""

    def __init__(self, images: torch.Tensor, batch: int = 32) -> None:
        self.batches = iter(images[i : i + batch].numpy() for i in range(0, len(images), batch))

    def get_next(self) -> dict | None:
        x = next(self.batches, None)
        return None if x is None else {"images": x}


def quantize_onnx(src: str | Path, dst: str | Path, calibration: torch.Tensor | None = None) -> str:
    """An int8 copy of an fp32 ONNX model, written atomically. With `calibration` (normalized images, e.g.
    a few hundred from the training split) activations are quantized statically (QDQ, per-channel int8
    weights, ranges from the calibration set); without it dynamically (int8 weights, activation ranges
    per batch at run time). Only MatMul / Gemm / Conv are quantized (dynamic: MatMul / Gemm, since
    onnxruntime's dynamic ConvInteger runs several times slower than the fp32 Conv); LayerNorm, Softmax
    and GELU stay fp32. Returns 'static' or 'dynamic'."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    pre = dst.with_name(f".{dst.name}.pre.onnx")
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        ops = ["MatMul", "Gemm", "Conv"]
        if calibration is not None:
            quantize_static(
                str(pre), str(tmp), _Calibration(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                extra_options={"ActivationSymmetric": True},
            )  # fmt: skip
            mode = "static"
        else:
            quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=ops[:2])
            mode = "dynamic"
        tmp.replace(dst)
    finally:
        pre.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (%s int8 quantization of %s)", dst, mode, src.name)
    return mode


def onnx_scores(path: str | Path, images: torch.Tensor, labels: torch.Tensor, *, batch: int = 64) -> dict[str, float]:
    """Top-1 (%) of an ONNX model on normalized `images`, and its throughput (images/s, onnxruntime on the
    CPU, the session's default threads, `batch` images a run)."""
    import time

    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, {"images": images[:batch].numpy()})  # warm-up
    correct, t = 0, time.perf_counter()
    for i in range(0, len(images), batch):
        logits = session.run(None, {"images": images[i : i + batch].numpy()})[0]
        correct += int((logits.argmax(-1) == labels[i : i + batch].numpy()).sum())
    seconds = time.perf_counter() - t
    return {"top1": 100.0 * correct / len(images), "images_per_s": len(images) / seconds}
