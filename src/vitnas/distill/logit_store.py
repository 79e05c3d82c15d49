"""Stored sparse teacher logits (TinyViT's fast distillation), in a layout made for lookup.

A store is a folder:

    manifest.json       what the store holds and how it was made (teacher, data, recipe, K, epochs)
    epoch_0000.bin      one fixed-size record per training image, record i = image i
    epoch_0001.bin      ...
    epoch_0002.part/    an epoch being written: chunk_000000.bin, ... (each complete, renamed into place)

A record is the reference's: int32 augmentation seed, K class indices (int16; int32 only when there
are more than 32,767 classes), K fp16 probabilities sorted descending — 4K + 4 bytes, little-endian,
packed. Unlike the reference (one key-text file and one value file per rank and epoch, found by a
linear scan over the key files), an epoch is one file indexed by the image's position in the training
split, so a lookup is a memory-mapped slice: O(1), no keys to parse, any number of ranks.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitnas._io import atomic_open, atomic_write_text, corrupt_file_error

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LogitStore",
    "dense_targets",
    "record_dtype",
    "write_chunk",
    "assemble_epoch",
]

log = logging.getLogger(__name__)

FORMAT = "vitnas-logit-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INT16_MAX_CLASSES = 32767


def record_dtype(topk: int, num_classes: int) -> np.dtype:
    """The packed record: seed (int32), indices (int16, or int32 past 32,767 classes), values (fp16)."""
    index = "<i2" if num_classes <= INT16_MAX_CLASSES else "<i4"
    return np.dtype([("seed", "<i4"), ("index", index, (topk,)), ("value", "<f2", (topk,))])


def epoch_file(root: Path, epoch: int) -> Path:
    return root / f"epoch_{epoch:04d}.bin"


def chunk_dir(root: Path, epoch: int) -> Path:
    return root / f"epoch_{epoch:04d}.part"


def chunk_file(root: Path, epoch: int, chunk: int) -> Path:
    return chunk_dir(root, epoch) / f"chunk_{chunk:06d}.bin"


def write_chunk(path: Path, records: np.ndarray) -> None:
    """One chunk of records, written to a temporary file and renamed: a chunk exists whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(records.tobytes())


def assemble_epoch(root: Path, epoch: int, chunks: int, dtype: np.dtype, num_samples: int) -> Path:
    """Concatenate an epoch's chunks, in order, into its epoch file (atomically), then drop the chunks."""
    out = epoch_file(root, epoch)
    with atomic_open(out, "wb") as f:
        for c in range(chunks):
            with open(chunk_file(root, epoch, c), "rb") as part:
                shutil.copyfileobj(part, f, 1 << 22)
    size = out.stat().st_size
    if size != num_samples * dtype.itemsize:
        out.unlink()
        raise ValueError(f"{out}: assembled {size} bytes, expected {num_samples} records of {dtype.itemsize} bytes")
    shutil.rmtree(chunk_dir(root, epoch))
    return out


def dense_targets(indices: torch.Tensor, values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """TinyViT's dense target from a sparse top-K: the K stored probabilities at their classes and the
    rest of the mass, 1 - sum(top-K), spread evenly over the other C - K classes (clamped at 0: fp16
    values can sum to slightly over 1)."""
    values = values.float()
    k = values.shape[-1]
    rest = (1.0 - values.sum(-1, keepdim=True)).clamp_(min=0.0)
    fill = rest / (num_classes - k) if num_classes > k else torch.zeros_like(rest)
    out = fill.expand(values.shape[0], num_classes).clone()
    return out.scatter_(1, indices.long(), values)


class LogitStore:
    """A store folder opened for reading; `lookup(epoch, index)` gives the records of those images."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.root}: no {MANIFEST}; not a logit store (make one with vitnas save-logits)")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise corrupt_file_error(manifest, err) from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest}: format {self.manifest.get('format')!r} version {self.manifest.get('version')!r}; "
                f"expected {FORMAT!r} version {FORMAT_VERSION}"
            )
        self.topk = int(self.manifest["topk"])
        self.num_classes = int(self.manifest["num_classes"])
        self.num_samples = int(self.manifest["num_samples"])
        self.dtype = record_dtype(self.topk, self.num_classes)
        self._maps: dict[int, np.memmap] = {}
        # Complete epochs when opened: 0 .. epochs - 1 all have their file (a store being extended has
        # more planned in its manifest). Counted once: training reads it every step.
        self.epochs = 0
        while epoch_file(self.root, self.epochs).is_file():
            self.epochs += 1

    def records(self, epoch: int) -> np.memmap:
        if epoch not in self._maps:
            path = epoch_file(self.root, epoch)
            if not path.is_file():
                raise ValueError(f"{self.root}: holds {self.epochs} complete epochs, not epoch {epoch}")
            expected = self.num_samples * self.dtype.itemsize
            if path.stat().st_size != expected:
                size = path.stat().st_size
                raise ValueError(f"{path}: {size} bytes, expected {expected} ({self.num_samples} records)")
            self._maps[epoch] = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.num_samples,))
        return self._maps[epoch]

    def seeds(self, epoch: int, index: np.ndarray) -> np.ndarray:
        """The augmentation seeds (int32) of images `index` in `epoch`."""
        return self._records(epoch, index)["seed"].copy()

    def _records(self, epoch: int, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        if index.size and (index.min() < 0 or index.max() >= self.num_samples):
            raise IndexError(f"{self.root}: image index out of range 0..{self.num_samples - 1}")
        return self.records(epoch)[index]

    def lookup(self, epoch: int, index: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(seeds int32, class indices (B, K) long, probabilities (B, K) float32) of images `index`."""
        rec = self._records(epoch, index)
        return (
            rec["seed"].copy(),
            torch.from_numpy(rec["index"].astype(np.int64)),
            torch.from_numpy(rec["value"].astype(np.float32)),
        )

    def check(self, expected: dict[str, Any], *, what: str = "this run") -> None:
        """Raise naming the first manifest field that differs from `expected` (teacher, data, recipe, ...)."""
        for key, value in expected.items():
            have = self.manifest.get(key)
            if isinstance(have, dict) and isinstance(value, dict):  # name the inner field that differs
                for sub in sorted(set(have) | set(value)):
                    if have.get(sub) != value.get(sub):
                        key, have, value = f"{key}.{sub}", have.get(sub), value.get(sub)
                        break
            if have != value:
                raise ValueError(
                    f"{self.root}: the store was made with {key}={_short(have)}, {what} has {key}={_short(value)}"
                )


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 300 else text[:300] + "..."
