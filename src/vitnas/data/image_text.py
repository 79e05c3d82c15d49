"""Image-text pairs for CLIP training (TinyCLIP): CSV / TSV files as open_clip reads them, webdataset tar
shards, and prompt captions over class-labelled images (an image folder or the bundled digits) that need no
download.

Every source yields the same batches (`ImageTextBatch`): uint8 images (B, 3, S, S) resized and center-cropped,
B captions and, where the source has them, class labels. A bad row (missing or unreadable image, empty caption,
corrupt shard) is a DataError that names the file, row or key, or with `skip_bad` a skip that is counted and
logged with examples: never a silent drop. Batch order is a pure function of (seed, epoch, rank), so a resumed
run skips exactly the batches it has done (`start`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from vitnas._io import atomic_write_text
from vitnas.data.datasets import (
    DIGITS_MAX_VAL,
    ImageData,
    Split,
    StreamSplit,
    epoch_batches,
    load_data,
    load_digits,
)
from vitnas.data.folder import DataError, _decode_one, _resize_center_crop

__all__ = [
    "CIFAR10_TEMPLATES",
    "DIGIT_NAMES",
    "DIGIT_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "BadSamples",
    "CaptionStream",
    "CaptionedSplit",
    "CsvPairs",
    "ImageTextBatch",
    "ImageTextData",
    "ImageTextSource",
    "ShardStream",
    "caption_choices",
    "fill_template",
    "is_pairs",
    "is_shards",
    "load_image_text",
    "read_csv_pairs",
    "write_shards",
]

log = logging.getLogger(__name__)

# CLIP's CIFAR-10 prompt ensemble (openai/CLIP data/prompts.md; also LAION-AI/CLIP_benchmark cifar10.py).
CIFAR10_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)
# The short ImageNet list open_clip ships as SIMPLE_IMAGENET_TEMPLATES (a subset of CLIP's 80 prompts chosen in
# CLIP's Prompt_Engineering_for_ImageNet notebook).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
# Readable names and prompts for the bundled handwritten digits (classes '0'..'9'); our own wording.
DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}.",
    "a handwritten digit {}.",
    "the digit {}, written by hand.",
    "a blurry photo of the number {}.",
    "a black and white picture of a handwritten {}.",
    "a low resolution image of the digit {}.",
    "the number {} written in ink.",
    "a small pixelated {}.",
)

Template = str | Callable[[str], str]

# open_clip's conventions: image members of a webdataset sample, its caption member, CSV defaults
# (src/open_clip_train/params.py --csv-separator / --csv-img-key / --csv-caption-key).
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "txt"
LABEL_KEY = "cls"
CSV_SEPARATOR, CSV_IMG_KEY, CSV_CAPTION_KEY = "\t", "filepath", "title"


def fill_template(template: Template, name: str) -> str:
    """A prompt: `template.format(name)` for strings (CLIP's lists), `template(name)` for callables."""
    return template.format(name) if isinstance(template, str) else template(name)


def caption_choices(n: int, n_templates: int, *, seed: int, epoch: int) -> np.ndarray:
    """The template index of each of `n` samples in one epoch: a pure function of (seed, epoch, index), so
    training is reproducible and a resumed run sees the captions it would have seen."""
    return np.random.default_rng([seed, epoch, 7877]).integers(n_templates, size=n)


class ImageTextBatch(NamedTuple):
    images: torch.Tensor  # uint8 (B, 3, S, S)
    captions: list[str]
    labels: torch.Tensor | None  # class labels where the source has them


class ImageTextSource(Protocol):
    """What a CLIP training task reads: train batches (shuffled, full, sharded by rank) or an ordered pass."""

    num_samples: int | None

    def batches(
        self,
        batch_size: int,
        *,
        epoch: int = 0,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        train: bool = True,
        start: int = 0,
    ) -> Iterator[ImageTextBatch]: ...


class BadSamples:
    """The rows one source skipped (`skip_bad`): a count and the first few messages, so a skip is never silent."""

    def __init__(self, where: str, keep: int = 5) -> None:
        self.where = where
        self.keep = keep
        self.count = 0
        self.examples: list[str] = []

    def handle(self, message: str, skip_bad: bool) -> None:
        """Raise a DataError for `message`, or with `skip_bad` count it."""
        if not skip_bad:
            raise DataError(f"{message}; pass skip_bad=True (--skip-bad-images) to skip such rows")
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(message)

    def report(self) -> None:
        if self.count:
            log.warning("%s: skipped %d bad samples (e.g. %s)", self.where, self.count, "; ".join(self.examples))


def _index_batches(
    n: int, batch_size: int, *, epoch: int, seed: int, rank: int, world: int, train: bool, start: int
) -> list[np.ndarray]:
    """Training: the seeded, rank-sharded full batches of `epoch` (see `epoch_batches`); otherwise every index
    once, in order, sharded across ranks, the last batch possibly short. The first `start` are left out."""
    if train:
        return epoch_batches(n, batch_size, seed=seed, epoch=epoch, rank=rank, world=world)[start:]
    idx = np.arange(n)[rank::world]
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)][start:]


# ---------------------------------------------------------------------------------------------------------------
# Class-labelled images with prompt captions (the embedded default)


class CaptionedSplit:
    """A class-labelled `Split` whose captions are prompts ("a photo of a {class}."): the template of each image
    is drawn per (index, epoch, seed), so every epoch sees another wording of the same label."""

    def __init__(self, split: Split, classnames: Sequence[str], templates: Sequence[Template]) -> None:
        if not templates:
            raise ValueError("captioning class-labelled images needs at least one template")
        self.split = split
        self.classnames = list(classnames)
        self.templates = list(templates)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def num_samples(self) -> int:
        return len(self.split)

    def captions(self, index: np.ndarray, *, epoch: int, seed: int, choice: np.ndarray | None = None) -> list[str]:
        """The captions of the images at `index` in `epoch` (`choice`: that epoch's `caption_choices`)."""
        if choice is None:
            choice = caption_choices(len(self), len(self.templates), seed=seed, epoch=epoch)
        labels = self.split.labels[torch.as_tensor(index, dtype=torch.long)].tolist()
        return [fill_template(self.templates[choice[i]], self.classnames[c]) for i, c in zip(index, labels)]

    def batches(
        self,
        batch_size: int,
        *,
        epoch: int = 0,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        train: bool = True,
        start: int = 0,
    ) -> Iterator[ImageTextBatch]:
        index = _index_batches(
            len(self), batch_size, epoch=epoch, seed=seed, rank=rank, world=world, train=train, start=start
        )
        choice = caption_choices(len(self), len(self.templates), seed=seed, epoch=epoch)
        for idx, (images, labels) in zip(index, self.split.batches(index)):
            yield ImageTextBatch(images, self.captions(idx, epoch=epoch, seed=seed, choice=choice), labels)


def readable_classname(folder: str) -> str:
    """A class folder's name as a prompt word: underscores and hyphens become spaces ('pickup_truck')."""
    return folder.replace("_", " ").replace("-", " ").strip()


# ---------------------------------------------------------------------------------------------------------------
# CSV / TSV of (image path, caption)


def _verify_image(path: Path) -> str | None:
    """None if the image header parses (cheap: no decoding), else why not."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:
        return f"not a readable image ({type(err).__name__}: {err})"
    return None


@dataclass
class CsvPairs:
    """(image path, caption) rows of a CSV / TSV file; images stream through DataLoader workers."""

    csv_path: Path
    paths: list[Path]
    captions: list[str]
    rows: list[int]  # the line of each pair in the file, for messages
    size: int
    workers: int = 2
    skipped: BadSamples | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_samples(self) -> int:
        return len(self.paths)

    def batches(
        self,
        batch_size: int,
        *,
        epoch: int = 0,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        train: bool = True,
        start: int = 0,
    ) -> Iterator[ImageTextBatch]:
        index = _index_batches(
            len(self), batch_size, epoch=epoch, seed=seed, rank=rank, world=world, train=train, start=start
        )
        if not index:
            return
        loader = DataLoader(
            _CsvImages(self), batch_sampler=[list(map(int, b)) for b in index], num_workers=self.workers
        )
        for idx, images in zip(index, loader):
            yield ImageTextBatch(images, [self.captions[i] for i in idx], None)


class _CsvImages(Dataset):
    def __init__(self, pairs: CsvPairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> torch.Tensor:
        p = self.pairs
        arr, err = _decode_one((str(p.paths[i]), p.size))
        if err is not None:
            raise DataError(f"{p.csv_path}: row {p.rows[i]}: {err}")
        return torch.from_numpy(arr)


def _csv_header_error(path: Path, header: list[str], keys: tuple[str, str], sep: str) -> DataError:
    other = "," if sep != "," else "\t"
    hint = ""
    if len(header) == 1 and other in header[0]:
        hint = f"; the header looks {'comma' if other == ',' else 'tab'}-separated: pass sep={other!r}"
    missing = [k for k in keys if k not in header]
    return DataError(
        f"{path}: column(s) {missing} not found; the header has {header} (separator {sep!r}; set the image and "
        f"caption columns with img_key / caption_key, open_clip's --csv-img-key / --csv-caption-key){hint}"
    )


def read_csv_pairs(
    path: str | Path,
    *,
    size: int,
    sep: str = CSV_SEPARATOR,
    img_key: str = CSV_IMG_KEY,
    caption_key: str = CSV_CAPTION_KEY,
    skip_bad: bool = False,
    workers: int = 2,
) -> CsvPairs:
    """Pairs from a CSV / TSV with a header row, as open_clip's CsvDataset reads it (tab-separated, columns
    'filepath' and 'title' by default). Relative image paths are read from the CSV's folder (open_clip reads
    them from the working directory), so a data set can move as one folder. Rows with an empty path or caption
    or a missing file are an error naming the row, or skipped and counted with `skip_bad` (which also checks
    every image's header up front, so no unreadable file turns up mid-epoch)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    bad = BadSamples(str(path))
    paths, captions, rows = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        header = list(reader.fieldnames or [])
        if img_key not in header or caption_key not in header:
            raise _csv_header_error(path, header, (img_key, caption_key), sep)
        for row in reader:
            line = reader.line_num
            image, caption = (row.get(img_key) or "").strip(), (row.get(caption_key) or "").strip()
            file = path.parent / image
            if not image:
                bad.handle(f"{path}: row {line}: empty image path", skip_bad)
            elif not caption:
                bad.handle(f"{path}: row {line}: empty caption (image {image})", skip_bad)
            elif not file.is_file():
                bad.handle(f"{path}: row {line}: image file not found: {file} (relative to the CSV's folder)", skip_bad)
            elif skip_bad and (err := _verify_image(file)) is not None:
                bad.handle(f"{path}: row {line}: {file}: {err}", skip_bad)
            else:
                paths.append(file)
                captions.append(caption)
                rows.append(line)
    bad.report()
    if not paths:
        raise DataError(f"{path}: no usable rows (skipped {bad.count})")
    return CsvPairs(path, paths, captions, rows, size, workers, bad)


# ---------------------------------------------------------------------------------------------------------------
# webdataset tar shards


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Shard names from a brace pattern ('data/shard-{000000..000009}.tar', '::' joins patterns) or a list."""
    import webdataset as wds

    out = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
    if not out:
        raise DataError(f"{urls!r}: names no shards")
    return out


def shard_sizes(urls: Sequence[str]) -> int | None:
    """The number of samples in `urls` from `sizes.json` beside the first shard (open_clip's convention:
    {shard file name: samples}), or None when it is absent or does not list every shard."""
    sizes_file = Path(urls[0]).parent / "sizes.json"
    if not sizes_file.is_file():
        return None
    try:
        sizes = json.loads(sizes_file.read_text())
        return sum(int(sizes[Path(u).name]) for u in urls)
    except (KeyError, ValueError, TypeError) as err:
        log.warning("%s does not give the size of every shard (%s); the sample count is unknown", sizes_file, err)
        return None


def _truncated_tar(url: str) -> str | None:
    """Why a local tar file is cut short, or None. Python's tarfile reads a tar cut at a member boundary as if
    it ended there, which would drop the rest silently; a complete tar ends with two zero blocks of 512 bytes."""
    path = Path(url)
    if not path.is_file():
        return None  # a URL or pipe (read as is), or a missing file (an error when opened)
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read()
    if size % 512 or len(tail) < 1024 or tail.count(0) != len(tail):
        return f"truncated: {size:,} bytes with no end-of-archive marker; copy or write it again"
    return None


def _shard_samples(url: str, bad: BadSamples, skip_bad: bool) -> Iterator[dict[str, Any]]:
    """The raw samples (member suffix -> bytes) of one shard; an unreadable or corrupt shard is a DataError
    naming it, or with `skip_bad` the rest of it is skipped and counted."""
    import webdataset as wds

    truncated = _truncated_tar(url)
    if truncated is not None:
        bad.handle(f"{url}: unreadable or corrupt shard ({truncated}); none of its samples are used", skip_bad)
        return
    try:
        yield from wds.tariterators.tarfile_samples([{"url": url}], handler=wds.handlers.reraise_exception)
    except Exception as err:
        reason = str(err.args[0]) if err.args else ""
        bad.handle(f"{url}: unreadable or corrupt shard ({type(err).__name__}: {reason})", skip_bad)


def _decode_bytes(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = _resize_center_crop(im, size)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def _check_sample(sample: dict[str, Any]) -> str | None:
    """Why a raw sample is bad without decoding its pixels (no image or caption member, an empty caption, a
    label that is no integer, an image header that does not parse), or None."""
    where = f"{sample.get('__url__')}: sample {sample.get('__key__')!r}"
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    found = sorted(k for k in sample if not k.startswith("__"))
    if image_key is None:
        return f"{where}: no image (expected one of {'/'.join(IMAGE_KEYS)}; members {found})"
    if CAPTION_KEY not in sample:
        return f"{where}: no caption ({CAPTION_KEY!r} member; members {found})"
    if not sample[CAPTION_KEY].decode("utf-8", errors="replace").strip():
        return f"{where}: empty caption"
    if LABEL_KEY in sample and not sample[LABEL_KEY].strip().isdigit():
        return f"{where}: class label {sample[LABEL_KEY][:20]!r} is not a non-negative integer"
    try:
        with Image.open(io.BytesIO(sample[image_key])):
            pass
    except Exception as err:
        return f"{where}.{image_key}: not a readable image ({type(err).__name__}: {err})"
    return None


def _decode_sample(sample: dict[str, Any], size: int) -> tuple[np.ndarray, str, int | None] | str:
    """(uint8 CHW image, caption, label or None), or why the sample is bad."""
    why = _check_sample(sample)
    if why is not None:
        return why
    image_key = next(k for k in IMAGE_KEYS if k in sample)
    try:
        arr = _decode_bytes(sample[image_key], size)
    except Exception as err:  # any decoder failure is this sample's fault, named with its shard and key
        return (
            f"{sample.get('__url__')}: sample {sample.get('__key__')!r}.{image_key}: not a readable image "
            f"({type(err).__name__}: {err})"
        )
    caption = sample[CAPTION_KEY].decode("utf-8", errors="replace").strip()
    label = int(sample[LABEL_KEY]) if LABEL_KEY in sample else None
    return arr, caption, label


def _shuffled(samples: Iterable[dict[str, Any]], buffer: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """A seeded buffer shuffle of a stream (webdataset's `shuffle`, with our own generator)."""
    pool: list[dict[str, Any]] = []
    for s in samples:
        if len(pool) < buffer:
            pool.append(s)
            continue
        j = int(rng.integers(len(pool)))
        yield pool[j]
        pool[j] = s
    order = rng.permutation(len(pool))
    yield from (pool[j] for j in order)


def _collate(items: list[tuple[np.ndarray, str, int | None]]) -> ImageTextBatch:
    labels = [lab for _, _, lab in items]
    return ImageTextBatch(
        torch.from_numpy(np.stack([a for a, _, _ in items])),
        [c for _, c, _ in items],
        torch.tensor(labels, dtype=torch.long) if all(lab is not None for lab in labels) else None,
    )


def _batched(
    samples: Iterable[tuple[int, dict[str, Any]]],
    batch_size: int,
    *,
    size: int,
    bad: BadSamples,
    skip_bad: bool,
    skip: int = 0,
    drop_last: bool = True,
) -> Iterator[ImageTextBatch]:
    """Batches of decoded samples from a stream of (pass, raw sample). The first `skip` batches are counted
    without decoding pixels (resume); a whole pass with no usable sample is an error, not an endless loop."""
    items: list[tuple[np.ndarray, str, int | None]] = []
    to_skip, good_in_pass, current = skip * batch_size, 0, None
    for p, sample in samples:
        if p != current:
            if current is not None and good_in_pass == 0:
                raise DataError(f"{bad.where}: a whole pass over the shards gave no usable sample ({bad.count} bad)")
            current, good_in_pass = p, 0
        if to_skip:
            why = _check_sample(sample)
            if why is not None:
                bad.handle(why, skip_bad)
                continue
            to_skip -= 1
            good_in_pass += 1
            continue
        got = _decode_sample(sample, size)
        if isinstance(got, str):
            bad.handle(got, skip_bad)
            continue
        good_in_pass += 1
        items.append(got)
        if len(items) == batch_size:
            yield _collate(items)
            items = []
    if items and not drop_last:
        yield _collate(items)


@dataclass(frozen=True)
class _TrainPlan:
    """One rank's training stream of one epoch; each loader worker reads its own share of the shards."""

    urls: tuple[str, ...]
    size: int
    skip_bad: bool
    shuffle_buffer: int
    batch_size: int
    epoch: int
    seed: int
    rank: int
    world: int
    start: int

    def worker_batches(self, worker: int, n_workers: int) -> Iterator[ImageTextBatch]:
        """Worker `worker`'s batches, endless (pass after pass, each reshuffled). The loader takes batches from
        its workers in turn, so batch j of a run from step 0 is batch j // n_workers of part j % n_workers.
        A loader starts its round at worker 0 also when resuming, so worker w plays part (w + start) % n_workers
        and skips that part's batches before `start`: the resumed run continues exactly."""
        part = (worker + self.start) % n_workers
        stream, n_streams = self.rank * n_workers + part, self.world * n_workers
        bad = BadSamples(f"shards of rank {self.rank}, loader worker {worker}")

        def samples() -> Iterator[tuple[int, dict[str, Any]]]:
            for p in itertools.count():
                order = np.random.default_rng([self.seed, self.epoch, p, 5381]).permutation(len(self.urls))
                mine = [self.urls[j] for j in order[stream::n_streams]]
                raw = (s for url in mine for s in _shard_samples(url, bad, self.skip_bad))
                rng = np.random.default_rng([self.seed, self.epoch, p, stream, 6007])
                n = 0
                for s in _shuffled(raw, self.shuffle_buffer, rng):
                    n += 1
                    yield p, s
                bad.report()
                if n == 0:
                    raise DataError(f"{bad.where}: its shards {mine} gave no sample in a whole pass ({bad.count} bad)")

        skip = max(0, -(-(self.start - part) // n_workers))
        yield from _batched(samples(), self.batch_size, size=self.size, bad=bad, skip_bad=self.skip_bad, skip=skip)


class _ShardBatches(IterableDataset):
    def __init__(self, plan: _TrainPlan) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator[ImageTextBatch]:
        info = get_worker_info()
        return self.plan.worker_batches(info.id if info else 0, info.num_workers if info else 1)


class ShardStream:
    """Image-text pairs streamed from webdataset tar shards in open_clip's layout: each sample's image under
    jpg / jpeg / png / webp, its caption under txt, optionally a class label under cls. Training reads an
    endless, seeded stream (shards reshuffled each pass, a seeded sample buffer) cut into `steps` batches per
    epoch, so every rank takes the same number of steps; evaluation reads each rank's shards once, in order."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        size: int,
        skip_bad: bool = False,
        shuffle_buffer: int = 1000,
        workers: int = 0,
        num_samples: int | None = None,
    ) -> None:
        self.urls = expand_shards(urls)
        self.size = size
        self.skip_bad = skip_bad
        self.shuffle_buffer = shuffle_buffer
        self.workers = workers
        self.num_samples = num_samples if num_samples is not None else shard_sizes(self.urls)

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        """Batches per rank in one epoch: the samples (sizes.json or `num_samples`) over the global batch."""
        if self.num_samples is None:
            raise DataError(
                f"{self.urls[0]}: the number of samples in the shards is unknown; give num_samples or write a "
                "sizes.json beside them ({shard name: samples}, as write_shards does)"
            )
        steps = self.num_samples // (batch_size * world)
        if steps == 0:
            raise DataError(f"{self.num_samples} samples are fewer than one batch of {batch_size} x {world} ranks")
        return steps

    def loader_workers(self, world: int) -> int:
        """Loader workers per rank: `workers`, fewer when there are too few shards for every worker of every
        rank to read its own (at least 1: the rank's own process)."""
        if len(self.urls) < world:
            raise DataError(
                f"{len(self.urls)} shard(s) cannot feed {world} ranks (each rank reads its own shards); write more, "
                f"smaller shards (write_shards maxcount) starting from {self.urls[0]}"
            )
        n = min(max(self.workers, 1), len(self.urls) // world)
        if n < self.workers:
            log.info(
                "%d shards for %d rank(s): %d loader worker(s) per rank instead of %d",
                len(self.urls),
                world,
                n,
                self.workers,
            )
        return n

    def batches(
        self,
        batch_size: int,
        *,
        epoch: int = 0,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        train: bool = True,
        start: int = 0,
        steps: int | None = None,
    ) -> Iterator[ImageTextBatch]:
        if not train:
            bad = BadSamples(f"shards of rank {rank}")
            raw = ((0, s) for url in self.urls[rank::world] for s in _shard_samples(url, bad, self.skip_bad))
            yield from _batched(raw, batch_size, size=self.size, bad=bad, skip_bad=self.skip_bad, drop_last=False)
            bad.report()
            return
        steps = self.steps_per_epoch(batch_size, world) if steps is None else steps
        n_workers = self.loader_workers(world)
        plan = _TrainPlan(
            tuple(self.urls),
            self.size,
            self.skip_bad,
            self.shuffle_buffer,
            batch_size,
            epoch,
            seed,
            rank,
            world,
            start,
        )
        if self.workers > 0:
            stream: Iterable[ImageTextBatch] = DataLoader(
                _ShardBatches(plan), batch_size=None, num_workers=n_workers, persistent_workers=False
            )
        else:
            stream = plan.worker_batches(0, 1)
        for i, batch in enumerate(stream):
            if start + i >= steps:
                break
            yield batch


class CaptionStream(StreamSplit):
    """Webdataset shards as the trainer's streamed training split: each batch's captions travel in
    `extras["captions"]`, its labels are the shards' class labels (`cls`) or -1 where they have none."""

    def __init__(self, shards: ShardStream) -> None:
        self.shards = shards
        self.image_size = shards.size

    def __len__(self) -> int:
        return self.shards.num_samples or 0

    def steps_per_epoch(self, batch_size: int, world: int) -> int:
        return self.shards.steps_per_epoch(batch_size, world)

    def epoch(
        self, batch_size: int, *, epoch: int, seed: int, rank: int, world: int, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        for b in self.shards.batches(batch_size, epoch=epoch, seed=seed, rank=rank, world=world, start=start):
            labels = b.labels if b.labels is not None else torch.full((len(b.captions),), -1, dtype=torch.long)
            yield b.images, labels, {"captions": b.captions}


def _encode_image(image: Any) -> tuple[str, bytes]:
    """(member suffix, bytes) of an image given as a file path, encoded bytes, a PIL image, a uint8 array
    (H, W, 3) or a uint8 tensor (3, H, W); decoded images are stored as lossless PNG."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        suffix = path.suffix.lower().lstrip(".")
        if suffix not in IMAGE_KEYS:
            raise DataError(f"{path}: images in shards must be {'/'.join(IMAGE_KEYS)} files")
        return suffix, path.read_bytes()
    if isinstance(image, bytes):
        try:
            with Image.open(io.BytesIO(image)) as im:
                fmt = (im.format or "").lower()
        except Exception:
            fmt = ""  # stored as given: corrupt data is the caller's to write (tests of the reader do)
        return {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(fmt, "jpg"), image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image.astype(np.uint8)))
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot store an image of type {type(image).__name__} in a shard")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "png", buf.getvalue()


def write_shards(pairs: Iterable[Sequence[Any]], pattern: str | Path, maxcount: int = 10000) -> list[str]:
    """Write (image, caption[, label]) pairs as webdataset tar shards named by `pattern` ('out/shard-%06d.tar',
    at most `maxcount` samples each) with webdataset's ShardWriter, and their sizes to sizes.json beside them
    (open_clip's convention, read by ShardStream for the epoch length). Returns the shard paths."""
    import webdataset as wds

    pattern = str(pattern)
    if "%" not in pattern:
        raise ValueError(f"{pattern!r}: a shard pattern needs a %-format for the shard number, e.g. shard-%06d.tar")
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    counts: dict[str, int] = {}
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, post=written.append) as sink:
        for i, pair in enumerate(pairs):
            if len(pair) not in (2, 3):
                raise ValueError(f"pair {i}: expected (image, caption) or (image, caption, label), got {len(pair)}")
            key, data = _encode_image(pair[0])
            sample = {"__key__": f"{i:09d}", key: data, CAPTION_KEY: str(pair[1])}
            if len(pair) == 3:
                sample[LABEL_KEY] = str(int(pair[2]))
            sink.write(sample)
            name = Path(sink.fname).name  # the shard this sample went to
            counts[name] = counts.get(name, 0) + 1
    sizes_file = Path(pattern).parent / "sizes.json"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    atomic_write_text(sizes_file, json.dumps({**sizes, **counts}, indent=1, sort_keys=True) + "\n")
    log.info("wrote %d samples in %d shards (%s)", sum(counts.values()), len(written), pattern)
    return written


# ---------------------------------------------------------------------------------------------------------------
# One entry point


@dataclass
class ImageTextData:
    """Image-text training data, what it is validated on, and (for the class-labelled default) the labelled
    splits and readable class names that zero-shot evaluation scores against."""

    name: str
    train: ImageTextSource
    val: ImageTextSource | None
    classnames: list[str] | None = None
    templates: tuple[Template, ...] = ()
    images: ImageData | None = None  # the class-labelled splits behind a captioned default

    def summary(self) -> str:
        n_val = self.val.num_samples if self.val is not None else 0
        extra = f"; {len(self.classnames)} classes, {len(self.templates)} templates" if self.classnames else ""
        return f"{self.name}: train {self.train.num_samples or 'unknown'} pairs, val {n_val or 'none'}{extra}"


def is_shards(path: str | Path | Sequence[str]) -> bool:
    """Whether `path` names webdataset shards: a .tar file, a brace pattern ('shard-{000..009}.tar'), several
    '::'-joined patterns, or a list of them."""
    if isinstance(path, Path):
        path = str(path)
    if not isinstance(path, str):
        return True  # a list of shards
    return path.endswith(".tar") or "{" in path or "::" in path


def is_pairs(path: str | Path | Sequence[str] | None) -> bool:
    """Whether `path` names image-caption pairs (a .csv / .tsv file or webdataset shards) rather than an
    image-class folder or the bundled digits (None)."""
    if path is None:
        return False
    return is_shards(path) or Path(path).suffix.lower() in (".csv", ".tsv")


def _captioned(data: ImageData, classnames: Sequence[str], templates: Sequence[Template], name: str) -> ImageTextData:
    if len(classnames) != data.num_classes:
        raise ValueError(f"{name}: {len(classnames)} class names for {data.num_classes} classes")
    return ImageTextData(
        name,
        CaptionedSplit(data.train, classnames, templates),
        CaptionedSplit(data.val, classnames, templates),
        list(classnames),
        tuple(templates),
        data,
    )


def load_image_text(
    data_path: str | Path | Sequence[str] | None = None,
    *,
    img_size: int = 32,
    val_data: str | Path | Sequence[str] | None = None,
    val_per_class: int = 100,
    seed: int = 0,
    skip_bad: bool = False,
    templates: Sequence[Template] | None = None,
    classnames: Sequence[str] | None = None,
    csv_separator: str = CSV_SEPARATOR,
    csv_img_key: str = CSV_IMG_KEY,
    csv_caption_key: str = CSV_CAPTION_KEY,
    workers: int = 2,
    shuffle_buffer: int = 1000,
    cache_dir: str | Path | None = None,
) -> ImageTextData:
    """Image-text data by what `data_path` names: None, the bundled digits captioned with DIGIT_TEMPLATES; an
    image-class folder (root/train/<class>), its images captioned with `templates` (CLIP's CIFAR-10 list by
    default) and split into train / held-out val as `load_data` does; a .csv / .tsv of (image path, caption);
    or webdataset shards (.tar, a brace pattern, or a list). `val_data` names the validation pairs of the last two."""
    if data_path is None or (not is_shards(data_path) and Path(data_path).is_dir()):
        if data_path is None:
            data = load_digits(img_size, val_per_class=min(val_per_class, DIGITS_MAX_VAL), seed=seed)
            names, default = DIGIT_NAMES, DIGIT_TEMPLATES
        else:
            data = load_data(
                data_path,
                img_size=img_size,
                val_per_class=val_per_class,
                seed=seed,
                skip_bad=skip_bad,
                workers=workers,
                cache_dir=cache_dir,
            )
            names, default = tuple(readable_classname(c) for c in data.classes), CIFAR10_TEMPLATES
        out = _captioned(data, classnames or names, templates or default, data.name)
        log.info("%s", out.summary())
        return out

    def source(path: str | Path | Sequence[str]) -> ImageTextSource:
        if is_shards(path):
            return ShardStream(
                path if not isinstance(path, Path) else str(path),
                size=img_size,
                skip_bad=skip_bad,
                shuffle_buffer=shuffle_buffer,
                workers=workers,
            )
        if Path(path).suffix.lower() in (".csv", ".tsv"):
            return read_csv_pairs(
                path,
                size=img_size,
                sep=csv_separator,
                img_key=csv_img_key,
                caption_key=csv_caption_key,
                skip_bad=skip_bad,
                workers=workers,
            )
        raise DataError(
            f"{path}: not an image-text data set (expected an image-class folder, a .csv / .tsv file, or .tar "
            "webdataset shards)"
        )

    name = Path(data_path).stem if isinstance(data_path, (str, Path)) else "shards"
    out = ImageTextData(name, source(data_path), source(val_data) if val_data is not None else None)
    log.info("%s", out.summary())
    return out
