"""Image folders in the ImageNet layout: root/<split>/<class>/<image>.

Small images (CIFAR-size) are decoded once into a uint8 tensor and cached on disk, so an epoch costs
no JPEG decoding; large images stream through DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitnas._io import atomic_save_safetensors

__all__ = ["FolderIndex", "scan_image_folder", "decode_images", "load_cached_split", "DataError"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Files that operating systems leave in folders; never images, never an error.
IGNORED_FILES = ("thumbs.db", "desktop.ini")


class DataError(ValueError):
    """Bad input data; the message names the offending path."""


@dataclass
class FolderIndex:
    root: Path
    classes: list[str]
    paths: list[Path]
    labels: list[int]
    skipped: list[str] = field(default_factory=list)  # files skipped as unreadable (skip_bad=True)
    not_images: list[str] = field(default_factory=list)  # files left out for a non-image extension

    def __len__(self) -> int:
        return len(self.paths)

    def warn_skipped(self) -> None:
        if self.skipped:
            log.warning(
                "skipped %d unreadable files under %s (first: %s)", len(self.skipped), self.root, self.skipped[0]
            )


def scan_image_folder(root: str | Path, split: str, *, classes: list[str] | None = None) -> FolderIndex:
    """List `root/split/<class>/*` images. `classes` (from another split) must match exactly."""
    root = Path(root)
    split_dir = root / split
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (expected {root}/<split>/<class>/<images>)")
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"{split_dir}: split folder not found; {root} holds {found or 'no folders'}")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<images>)")
    if classes is not None and found != list(classes):
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise DataError(
            f"{split_dir}: class folders differ from the training split's: missing {missing}, unexpected {extra}"
        )
    paths, labels, other = [], [], []
    for label, name in enumerate(found):
        files = sorted(
            f
            for f in (split_dir / name).iterdir()
            if f.is_file() and not f.name.startswith(".") and f.name.lower() not in IGNORED_FILES
        )
        images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        other += [f for f in files if f.suffix.lower() not in IMAGE_EXTENSIONS]
        if not files:
            raise DataError(f"{split_dir / name}: empty class folder (no files)")
        if not images:
            raise DataError(
                f"{split_dir / name}: no image files (extensions {', '.join(IMAGE_EXTENSIONS)}); found "
                f"{[f.name for f in files[:5]] or 'nothing'}"
            )
        paths += images  # a file named like an image that is not one is an error when decoded
        labels += [label] * len(images)
    if other:
        log.warning(
            "%s: skipped %d files that are not images by their extension (first: %s)", split_dir, len(other), other[0]
        )
    return FolderIndex(root, found, paths, labels, not_images=[str(f) for f in other])


def verify_images(index: FolderIndex) -> None:
    """Drop files whose image header does not parse (cheap: no decoding), counting them in `skipped`."""
    keep_p, keep_l = [], []
    for path, label in zip(index.paths, index.labels):
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as err:
            index.skipped.append(f"{path}: not a readable image ({type(err).__name__}: {err})")
            continue
        keep_p.append(path)
        keep_l.append(label)
    index.warn_skipped()
    index.paths, index.labels = keep_p, keep_l


def _decode_one(args: tuple[str, int | None]) -> tuple[np.ndarray | None, str | None]:
    path, size = args
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = _resize_center_crop(im, size)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy(), None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return None, f"{path}: not a readable image ({type(err).__name__}: {err})"


def _resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def decode_images(
    index: FolderIndex, size: int | None = None, *, skip_bad: bool = False, workers: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image to a uint8 tensor (N, 3, H, W); images of another size are resized and
    center-cropped to `size`. A corrupt file raises DataError naming it, or with `skip_bad` is
    skipped and counted in `index.skipped`."""
    workers = workers or min(4, os.cpu_count() or 1)
    jobs = [(str(p), size) for p in index.paths]
    if workers > 1 and len(jobs) > 256:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_decode_one, jobs, chunksize=256))
    else:
        results = [_decode_one(j) for j in jobs]
    images, labels = [], []
    for (arr, err), label in zip(results, index.labels):
        if err is not None:
            if not skip_bad:
                raise DataError(err + "; pass skip_bad=True (--skip-bad-images) to skip such files")
            index.skipped.append(err)
            continue
        images.append(arr)
        labels.append(label)
    index.warn_skipped()
    if not images:
        raise DataError(f"{index.root}: no readable images")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{index.root}: images have different sizes {sorted(shapes)[:3]}...; pass an image size")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long)


def _cache_key(index: FolderIndex, size: int | None, skip_bad: bool) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([size, skip_bad, index.classes]).encode())
    for p in index.paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("VITNAS_CACHE", Path.home() / ".cache" / "vitnas"))


def load_cached_split(
    root: str | Path,
    split: str,
    *,
    size: int | None = None,
    classes: list[str] | None = None,
    skip_bad: bool = False,
    cache_dir: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decoded split as (uint8 images, labels, classes), cached on disk keyed by the files' names,
    sizes and times, so a changed folder is decoded again."""
    from safetensors.torch import load_file

    index = scan_image_folder(root, split, classes=classes)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"{Path(root).name}-{split}-{_cache_key(index, size, skip_bad)}.safetensors"
    if path.is_file():
        try:
            data = load_file(path)
            return data["images"], data["labels"], index.classes
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s: %s", path, err)
    log.info("decoding %d images of %s/%s (cached at %s)", len(index), root, split, path)
    images, labels = decode_images(index, size, skip_bad=skip_bad)
    try:
        atomic_save_safetensors({"images": images, "labels": labels}, path)
    except OSError as err:
        log.warning("could not write cache %s: %s", path, err)
    return images, labels, index.classes
