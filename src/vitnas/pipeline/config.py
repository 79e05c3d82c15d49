"""The pipeline's one YAML: which supernet, the search, fine-tune and export settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitnas._config import check_fields
from vitnas.space.yaml_io import load_yaml

__all__ = ["PipelineConfig"]


@dataclass
class PipelineConfig:
    out_dir: str = "runs/search"
    checkpoint: str | None = None  # a trained supernet checkpoint; null = train one from `train`
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (task is supernet)
    search: dict[str, Any] = field(default_factory=dict)  # SearchConfig fields
    baseline: bool = True  # also run random search at the same budget, for the comparison plot
    onnx: bool = False  # also export ONNX, checked against onnxruntime
    finetune_epochs: int = 0  # fine-tune the winner with inherited weights; 0 = skip
    finetune: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for the fine-tune
    latency_check: int = 8  # archs on which the latency table's prediction error is measured

    source: str = field(default="pipeline config", repr=False, compare=False)  # names errors

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with keys such as out_dir, train, search")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
        for key in data:
            if key not in names:
                raise ValueError(f"{path}: unknown key {key!r}; expected one of {names}")
        obj = cls(**data, source=str(path))
        check_fields(obj, str(path))
        return obj
