"""Training runs shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this imports)."""

from __future__ import annotations

import time
from pathlib import Path

from vitnas.data import AugmentConfig, ImageData
from vitnas.evaluation import evaluate
from vitnas.models.spec import load_model
from vitnas.train import TrainConfig, Trainer


def fit(cfg: TrainConfig, data: ImageData, device: str | None = None) -> tuple[Path, float]:
    """Train (or finish, or skip a finished) run in cfg.out_dir; (its checkpoint, seconds spent now)."""
    trainer = Trainer(cfg, data=data, device=device, resume=True)
    t = time.perf_counter()
    if not trainer.is_finished():
        trainer.fit()
    return trainer.ckpt_path, time.perf_counter() - t


def test_top1(ckpt: Path, data: ImageData, device: str = "cpu") -> float:
    """Test-split top-1 of the model a checkpoint holds."""
    model, meta = load_model(ckpt)
    norm = AugmentConfig.from_dict(meta["norm"])
    return evaluate(model.to(device), data.test, img_size=meta["img_size"], norm=norm, device=device)["top1"]
