"""Data sets as the trainer sees them: train / validation / test splits with batch access.

The validation split is held out from the training images (seeded, N per class, like AutoFormer's
100 per class) and is what search and model selection use; the test split is only for final reports.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitnas.data.folder import DataError, _decode_one, load_cached_split, scan_image_folder, verify_images

__all__ = ["ImageData", "Split", "StreamSplit", "load_data", "load_digits", "holdout_split", "epoch_batches"]

log = logging.getLogger(__name__)

# Images whose side is at most this are decoded once and cached in memory; larger ones stream.
CACHE_MAX_SIDE = 64


class Split:
    """Images with labels; `batches(index_batches)` yields uint8 (B, 3, H, W) and labels."""

    def __init__(
        self,
        labels: torch.Tensor,
        images: torch.Tensor | None = None,
        paths: Sequence[Path] | None = None,
        load_size: int | None = None,
        workers: int = 2,
    ) -> None:
        self.labels = labels
        self.images = images
        self.paths = list(paths) if paths is not None else None
        self.load_size = load_size
        self.workers = workers

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1]) if self.images is not None else int(self.load_size)

    def subset(self, idx: np.ndarray) -> Split:
        t = torch.as_tensor(idx, dtype=torch.long)
        if self.images is not None:
            return Split(self.labels[t], images=self.images[t])
        return Split(self.labels[t], paths=[self.paths[i] for i in idx], load_size=self.load_size, workers=self.workers)

    def batches(self, index_batches: Sequence[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.images is not None:
            for idx in index_batches:
                t = torch.as_tensor(idx, dtype=torch.long)
                yield self.images[t], self.labels[t]
            return
        loader = DataLoader(
            _Streaming(self),
            batch_sampler=[list(map(int, b)) for b in index_batches],
            num_workers=self.workers,
            persistent_workers=False,
        )
        yield from loader

    def take(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels at `index`, decoded in this process (a few images, e.g. mixing partners,
        where starting DataLoader workers would cost more than the decoding)."""
        if self.images is not None:
            t = torch.as_tensor(index, dtype=torch.long)
            return self.images[t], self.labels[t]
        items = [_Streaming(self)[int(i)] for i in index]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    def digest(self) -> str:
        """Names these exact images: blake2b of the pixels and labels of a cached split, or of the file
        list (class folder / name) with sizes and labels of a streamed one."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.labels.numpy().astype("<i8").tobytes())
        if self.images is not None:
            h.update(str(tuple(self.images.shape)).encode())
            h.update(self.images.contiguous().numpy().tobytes())
        else:
            for p in self.paths:
                h.update(f"{p.parent.name}/{p.name}:{p.stat().st_size};".encode())
        return h.hexdigest()

    def sequential(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image once, in order, sharded across ranks (for evaluation)."""
        idx = np.arange(len(self))[rank::world]
        yield from self.batches([idx[i : i + batch_size] for i in range(0, len(idx), batch_size)])


class StreamSplit:
    """Training data read as a stream instead of by index (webdataset shards): an epoch is `steps_per_epoch`
    batches cut from a seeded stream, and each batch carries its per-sample data (captions) in `extras`
    instead of dataset indices. The trainer takes it in place of an indexed `Split` as `ImageData.train`; a
    resumed run asks `epoch(..., start=k)` for the same epoch without its first k batches, so the stream must
    be a pure function of (seed, epoch, rank, world)."""

    image_size: int

    def __len__(self) -> int:
        """Samples in one pass (for summaries)."""
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int, world: int) -> int:
        """Batches each of `world` ranks takes per epoch (the same on every rank)."""
        raise NotImplementedError

    def epoch(
        self, batch_size: int, *, epoch: int, seed: int, rank: int, world: int, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """(uint8 images (B, 3, S, S), labels (B,), extras) of this rank's batches of `epoch` from `start`."""
        raise NotImplementedError


class _Streaming(Dataset):
    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        arr, err = _decode_one((str(self.split.paths[i]), self.split.load_size))
        if err is not None:
            raise DataError(err)
        return torch.from_numpy(arr), self.split.labels[i]


@dataclass
class ImageData:
    name: str
    classes: list[str]
    train: Split | StreamSplit
    val: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.train.image_size

    def summary(self) -> str:
        return (
            f"{self.name}: {self.num_classes} classes, {self.image_size}px; train {len(self.train)}, "
            f"val {len(self.val)} (held out from train), test {len(self.test)}"
        )

    def with_train_per_class(self, per_class: int, seed: int = 0) -> ImageData:
        """`per_class` training images of every class (seeded; all of a class that has fewer), with the
        validation and test splits unchanged: a smaller training set for budgeted experiments."""
        if per_class <= 0:
            raise ValueError(f"{self.name}: per_class={per_class}; expected a positive number of images per class")
        labels = self.train.labels.numpy()
        rng = np.random.default_rng([seed, 4099])
        keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
        return ImageData(self.name, self.classes, self.train.subset(np.sort(np.concatenate(keep))), self.val, self.test)


def holdout_split(
    labels: torch.Tensor, per_class: int, seed: int, classes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): `per_class` images of every class go to validation."""
    labels_np = labels.numpy()
    rng = np.random.default_rng([seed, 7919])
    val = []
    for c in np.unique(labels_np):
        idx = np.flatnonzero(labels_np == c)
        if len(idx) <= per_class:
            name = classes[int(c)] if classes else int(c)
            raise DataError(
                f"class {name!r} has {len(idx)} training images, too few to hold out {per_class} "
                f"for validation (lower val_per_class)"
            )
        val.append(rng.choice(idx, size=per_class, replace=False))
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels_np)), val_idx)
    return train_idx, val_idx


def epoch_batches(
    n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1, repeats: int = 1
) -> list[np.ndarray]:
    """The index batches of one epoch for one rank: a permutation seeded by (seed, epoch), each index
    repeated `repeats` times (repeated augmentation, as DeiT's RASampler), split across ranks so all
    ranks take the same number of full batches. Pure function of its arguments, so a resumed run
    skips exactly the batches it has done."""
    rng = np.random.default_rng([seed, epoch, 104729])
    order = rng.permutation(n)
    if repeats > 1:
        order = np.repeat(order, repeats)
    per_rank = len(order) // world
    if repeats > 1:
        # DeiT keeps epoch length at n: the repeats replace, not add, samples
        per_rank = min(per_rank, n // world)
    mine = order[rank::world][:per_rank]
    steps = len(mine) // batch_size
    if steps == 0:
        raise DataError(f"{n} training images are fewer than one batch of {batch_size} per rank x {world} ranks")
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


# The embedded digits hold ~144 images per class besides the test split: at most this many are held out
# for validation (the folder default of 100 would leave too few to train on).
DIGITS_MAX_VAL = 50


def load_digits(img_size: int = 32, val_per_class: int = 20, seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes): the embedded default,
    available on any machine with no download. Upscaled to `img_size` RGB so any model takes them."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    images = torch.nn.functional.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(d.target).long()
    # The test split is fixed (not drawn from `seed`): runs with other seeds never train on its images.
    perm = np.random.default_rng(31).permutation(len(labels))
    n_test = int(len(labels) * test_fraction)
    test_idx, rest = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    full_train = Split(labels[rest], images=images[rest])
    tr, va = holdout_split(full_train.labels, val_per_class, seed)
    return ImageData(
        "digits",
        [str(i) for i in range(10)],
        full_train.subset(tr),
        full_train.subset(va),
        Split(labels[test_idx], images=images[test_idx]),
    )


def _test_split_name(root: Path) -> str:
    for name in ("test", "val"):
        if (root / name).is_dir():
            return name
    raise DataError(f"{root}: no test split folder (expected {root}/test or {root}/val beside {root}/train)")


def load_data(
    data_path: str | Path | None = None,
    *,
    img_size: int | None = None,
    val_per_class: int = 100,
    seed: int = 0,
    skip_bad: bool = False,
    stream: bool | None = None,
    workers: int = 2,
    cache_dir: str | Path | None = None,
) -> ImageData:
    """Image folders (`root/train/<class>/...` and `root/test` or `root/val`), or the embedded digits
    when `data_path` is None. Small images are decoded once and cached; large ones stream."""
    if data_path is None:
        return load_digits(img_size or 32, val_per_class=min(val_per_class, DIGITS_MAX_VAL), seed=seed)
    root = Path(data_path)
    train_index = scan_image_folder(root, "train")
    test_name = _test_split_name(root)
    if stream is None:  # decided by the first readable image
        for path in train_index.paths:
            arr, err = _decode_one((str(path), None))
            if err is None:
                break
            if not skip_bad:
                raise DataError(err + "; pass skip_bad=True (--skip-bad-images) to skip such files")
        else:
            raise DataError(f"{root / 'train'}: no readable images")
        stream = max(arr.shape[1:]) > CACHE_MAX_SIDE
    if not stream:
        x, y, classes = load_cached_split(root, "train", size=img_size, skip_bad=skip_bad, cache_dir=cache_dir)
        tx, ty, _ = load_cached_split(
            root, test_name, size=img_size, classes=classes, skip_bad=skip_bad, cache_dir=cache_dir
        )
        full, test = Split(y, images=x), Split(ty, images=tx)
    else:
        if img_size is None:
            raise DataError(f"{root}: large images stream from disk and need an explicit img_size")
        load = int(round(img_size / 0.875)) if img_size >= 64 else img_size
        test_index = scan_image_folder(root, test_name, classes=train_index.classes)
        if skip_bad:  # streamed files are checked up front (headers only), not hours into training
            verify_images(train_index)
            verify_images(test_index)
        classes = train_index.classes
        full = Split(torch.tensor(train_index.labels), paths=train_index.paths, load_size=load, workers=workers)
        test = Split(torch.tensor(test_index.labels), paths=test_index.paths, load_size=load, workers=workers)
    tr, va = holdout_split(full.labels, val_per_class, seed, classes)
    data = ImageData(root.name, classes, full.subset(tr), full.subset(va), test)
    log.info("%s", data.summary())
    return data


def load_data_of(meta: dict[str, Any], *, data_path: str | Path | None = None, source: str = "checkpoint") -> ImageData:
    """The data (and train / validation split) a checkpoint was trained on, from its metadata: its
    data_path (or `data_path`), image size, held-out count and seed; checked to have its classes and,
    where the checkpoint records it, the same number of held-out images (a validation split that
    overlaps the training images would flatter every candidate)."""
    cfg = meta["config"]
    path = data_path or cfg["data_path"]
    val_per_class = cfg["val_per_class"]
    if path is None and "val_images" not in meta:  # saved when the digits held out at most 20 per class
        val_per_class = min(val_per_class, 20)
    data = load_data(path, img_size=meta["img_size"], val_per_class=val_per_class, seed=cfg["seed"])
    if data.classes != meta["classes"]:
        raise ValueError(f"{source}: trained on classes {meta['classes']}, the data has {data.classes}")
    if "val_images" in meta and len(data.val) != meta["val_images"]:
        raise ValueError(
            f"{source}: trained holding out {meta['val_images']} validation images, the data now gives "
            f"{len(data.val)} (val_per_class={val_per_class}); the validation split would overlap training"
        )
    return data
