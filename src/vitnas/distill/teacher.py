"""A frozen teacher from any model vitnas can build: a registered model name (+ weights), an exported
folder, or a training checkpoint of a single model. Always in eval mode, never tracked by autograd,
run in reduced precision where the device has it fast (`auto`: `vitnas.precision`) or held in one."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitnas.costs.macs import model_input_size
from vitnas.export import load_subnet
from vitnas.models.registry import create_model, list_models
from vitnas.models.spec import is_supernet, load_model, spec_of
from vitnas.models.weights import load_weights
from vitnas.precision import amp_dtype, autocast

__all__ = ["TEACHER_DTYPES", "Teacher", "load_teacher"]

log = logging.getLogger(__name__)

# auto: fp32 weights under autocast where amp `auto` picks a reduced precision (bf16 on CPUs with AMX or
# AVX512-BF16, on CUDA), plain fp32 elsewhere; the others hold the weights in that dtype.
TEACHER_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def file_digest(path: str | Path, limit: int = 1 << 62) -> str:
    """sha256 of a file (of `model.safetensors` for a folder): names the exact teacher weights."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Teacher:
    """`teacher(images) -> float32 logits`, in inference mode."""

    def __init__(self, model: nn.Module, *, source: str, digest: str | None, dtype: str = "auto") -> None:
        if dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype={dtype!r}; expected one of {list(TEACHER_DTYPES)}")
        self.auto = TEACHER_DTYPES[dtype] is None
        self.dtype = TEACHER_DTYPES[dtype] or torch.float32
        self.model = model.eval().to(self.dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.source, self.digest = source, digest
        self.input_size = model_input_size(model)
        with torch.inference_mode():
            probe = self.model(torch.zeros(1, *self.input_size, dtype=self.dtype))
        self.num_classes = int(probe.shape[-1])

    def to(self, device: torch.device) -> Teacher:
        self.model.to(device)
        return self

    def compute_dtype(self) -> str:
        """The precision the teacher's matmuls run in where its weights are (what a logit store records)."""
        device = next(self.model.parameters()).device
        dtype = (amp_dtype("auto", device) or torch.float32) if self.auto else self.dtype
        return str(dtype).removeprefix("torch.")

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.auto:
            with autocast(images.device, amp_dtype("auto", images.device)):
                return self.model(images).float()
        return self.model(images.to(self.dtype)).float()

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about its teacher: where it came from, its spec, its weights' digest."""
        return {"source": self.source, "spec": spec_of(self.model), "digest": self.digest}

    def check_fits(self, *, num_classes: int, img_size: int, student: str) -> None:
        """Raise unless the teacher predicts the student's classes at the student's input size."""
        if self.num_classes != num_classes:
            raise ValueError(
                f"teacher {self.source} predicts {self.num_classes} classes, {student} {num_classes}: a teacher "
                f"must be trained on the same classes (fine-tune it on this data first)"
            )
        if self.input_size[1:] != (img_size, img_size):
            raise ValueError(
                f"teacher {self.source} takes {self.input_size[1]}x{self.input_size[2]} images, {student} "
                f"{img_size}x{img_size}: train both at one resolution (img_size)"
            )


def load_teacher(
    spec: str,
    *,
    weights: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    dtype: str = "auto",
) -> Teacher:
    """`spec`: an exported folder, a vitnas training checkpoint, or a registered model name (built with
    `num_classes` / `img_size`, its weights from `weights`, which must fit it exactly)."""
    path = Path(spec)
    if path.is_dir():
        if weights:
            raise ValueError(f"teacher {spec} is an exported folder: it brings its own weights (drop teacher_weights)")
        return Teacher(load_subnet(path), source=spec, digest=file_digest(path), dtype=dtype)
    if path.is_file():
        if weights:
            raise ValueError(f"teacher {spec} is a checkpoint: it brings its own weights (drop teacher_weights)")
        model, meta = load_model(path)
        if is_supernet(meta["model"]["kind"]):
            raise ValueError(f"teacher {spec} holds a supernet: export one subnet first (vitnas export --arch)")
        return Teacher(model, source=spec, digest=file_digest(path), dtype=dtype)
    if spec not in list_models():
        raise ValueError(f"teacher {spec!r} is neither an exported folder, a checkpoint file nor a registered model")
    if not weights:
        raise ValueError(f"teacher {spec!r} is a registered model: give its trained weights (teacher_weights)")
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    model = create_model(spec, **kwargs)
    report = load_weights(model, weights)
    if report["skipped"]:
        raise ValueError(
            f"teacher weights {weights} do not fit {spec} with {num_classes} classes (skipped {report['skipped'][:4]}):"
            f" a teacher must be trained on the student's classes"
        )
    return Teacher(model, source=f"{spec}:{weights}", digest=file_digest(weights), dtype=dtype)
