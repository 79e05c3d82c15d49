"""A run's logs: metrics.csv (train rows) and TensorBoard (train and validation scalars), both cut back
to the resumed step so a resumed run has no duplicate rows."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

__all__ = ["RunLog"]

log = logging.getLogger(__name__)


class RunLog:
    def __init__(self, out: Path, start_step: int) -> None:
        self.csv = _CsvLog(out / "metrics.csv", start_step)
        self.tb = _tensorboard(out / "tb", start_step)

    def train_row(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> None:
        self.csv.write({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "images_per_s": images_per_s})
        if self.tb:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/images_per_s", images_per_s, step)

    def val_row(self, metrics: dict[str, Any], step: int) -> None:
        if self.tb:
            for k, v in metrics.items():
                if k not in ("epoch", "step"):
                    self.tb.add_scalar(f"val/{k}", v, step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()


class _CsvLog:
    """metrics.csv, truncated to the resumed step so a resumed run has no duplicate rows."""

    FIELDS = ["step", "epoch", "loss", "lr", "images_per_s"]

    def __init__(self, path: Path, start_step: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if path.is_file() and start_step > 0:
            with open(path, newline="") as f:
                rows = [
                    r for r in csv.DictReader(f) if (r.get("step") or "").isdigit() and int(r["step"]) <= start_step
                ]
        self.path = path
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writerow({k: row[k] for k in self.FIELDS})


def _tensorboard(path: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but stay usable without it
        log.warning("tensorboard is not installed; writing CSV logs only")
        return None
    return SummaryWriter(str(path), purge_step=start_step or None)
