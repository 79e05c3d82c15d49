"""Image-text data (CSV, webdataset shards, captioned class images) and zero-shot classification, with images the
tests make and tiny fake CLIP models (no tokenizer or weights needed)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vitnas.data import DataError, Split
from vitnas.data.image_text import (
    CIFAR10_TEMPLATES,
    DIGIT_NAMES,
    DIGIT_TEMPLATES,
    CaptionedSplit,
    ShardStream,
    caption_choices,
    load_image_text,
    read_csv_pairs,
    write_shards,
)
from vitnas.zeroshot import evaluate_zeroshot, zeroshot_classifier

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def _image(i: int, size: int = 10) -> np.ndarray:
    """A distinct (size, size, 3) uint8 image per i."""
    return np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _collect(batches) -> tuple[torch.Tensor, list[str], list]:
    batches = list(batches)
    labels = [b.labels for b in batches]
    return torch.cat([b.images for b in batches]), [c for b in batches for c in b.captions], labels


# ---------------------------------------------------------------------------------------------------------------
# captioned class images (the embedded default)


def test_digits_default_is_captioned_and_deterministic():
    data = load_image_text(None, img_size=16, val_per_class=5, seed=0)
    assert data.classnames == list(DIGIT_NAMES) and data.templates == DIGIT_TEMPLATES
    assert data.images is not None and data.val.num_samples == 50
    b = next(iter(data.train.batches(8, epoch=0, seed=1)))
    assert b.images.shape == (8, 3, 16, 16) and b.images.dtype == torch.uint8 and b.labels.shape == (8,)
    for caption, label in zip(b.captions, b.labels.tolist()):
        assert re.search(rf"\b{DIGIT_NAMES[label]}\b", caption), (caption, label)
    again = next(iter(data.train.batches(8, epoch=0, seed=1)))
    assert again.captions == b.captions and torch.equal(again.images, b.images)
    # another epoch: another order and other wordings; the caption of one image depends on (index, epoch, seed)
    c0 = caption_choices(1000, len(DIGIT_TEMPLATES), seed=1, epoch=0)
    assert not np.array_equal(c0, caption_choices(1000, len(DIGIT_TEMPLATES), seed=1, epoch=1))
    assert np.array_equal(c0, caption_choices(1000, len(DIGIT_TEMPLATES), seed=1, epoch=0))


def test_captioned_resume_skips_exactly_the_batches_done():
    data = load_image_text(None, img_size=8, val_per_class=5)
    full = list(data.train.batches(32, epoch=3, seed=2))
    tail = list(data.train.batches(32, epoch=3, seed=2, start=5))
    assert len(tail) == len(full) - 5
    for a, b in zip(full[5:], tail):
        assert a.captions == b.captions and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_captioned_ranks_split_the_epoch_and_eval_sees_every_image_once():
    data = load_image_text(None, img_size=8, val_per_class=5)
    val = data.val
    images, captions, _ = _collect(val.batches(16, train=False))
    assert len(captions) == val.num_samples and images.shape[0] == val.num_samples
    halves = [_collect(val.batches(16, train=False, rank=r, world=2))[1] for r in (0, 1)]
    assert len(halves[0]) + len(halves[1]) == val.num_samples


def test_class_folder_default_has_readable_names_and_a_val_split(tmp_path):
    for split, n in (("train", 6), ("test", 2)):
        for name in ("pickup_truck", "cat"):
            d = tmp_path / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_image(i)).save(d / f"{i}.png")
    data = load_image_text(tmp_path, img_size=8, val_per_class=2, cache_dir=tmp_path / "cache")
    assert data.classnames == ["cat", "pickup truck"] and data.templates == CIFAR10_TEMPLATES
    assert data.train.num_samples == 8 and data.val.num_samples == 4
    b = next(iter(data.train.batches(4)))
    assert all(("cat" in c) != ("pickup truck" in c) for c in b.captions)


def test_captioned_split_needs_templates():
    with pytest.raises(ValueError, match="at least one template"):
        CaptionedSplit(Split(torch.zeros(2, dtype=torch.long), images=torch.zeros(2, 3, 4, 4)), ["a"], [])


# ---------------------------------------------------------------------------------------------------------------
# CSV / TSV


def _csv(tmp_path: Path, rows: list[tuple[str, str]], sep: str = "\t", name: str = "pairs.tsv") -> Path:
    lines = [f"filepath{sep}title"] + [f"{p}{sep}{c}" for p, c in rows]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _images(tmp_path: Path, n: int, size: int = 10) -> list[str]:
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(_image(i, size)).save(tmp_path / "img" / f"{i}.png")
    return [f"img/{i}.png" for i in range(n)]


def test_csv_pairs_read_relative_to_the_csv_folder(tmp_path, monkeypatch):
    names = _images(tmp_path, 6)
    path = _csv(tmp_path, [(n, f"caption {i}") for i, n in enumerate(names)])
    monkeypatch.chdir(tmp_path.parent)  # not the CSV's folder
    pairs = read_csv_pairs(path, size=10, workers=0)
    images, captions, labels = _collect(pairs.batches(4, train=False))
    assert captions == [f"caption {i}" for i in range(6)] and labels == [None, None]
    assert torch.equal(images[2], torch.from_numpy(_image(2)).permute(2, 0, 1))
    train = list(pairs.batches(4, epoch=0, seed=0))
    assert len(train) == 1 and len(train[0].captions) == 4  # full batches only when training
    data = load_image_text(path, img_size=10, val_data=path, workers=0)
    assert data.train.num_samples == 6 and data.val.num_samples == 6 and data.classnames is None


def test_csv_with_the_wrong_separator_says_which(tmp_path):
    path = _csv(tmp_path, [(n, "x") for n in _images(tmp_path, 2)], sep=",", name="pairs.csv")
    with pytest.raises(DataError, match=r"column\(s\) \['filepath', 'title'\] not found.*pass sep=','"):
        read_csv_pairs(path, size=10)
    assert len(read_csv_pairs(path, size=10, sep=",")) == 2


def test_csv_bad_rows_are_named_or_counted(tmp_path, caplog):
    names = _images(tmp_path, 3)
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    rows = [(names[0], "ok"), ("img/missing.png", "gone"), (names[1], " "), ("img/broken.png", "bad"), (names[2], "ok")]
    path = _csv(tmp_path, rows)
    with pytest.raises(DataError, match=r"row 3: image file not found: .*missing\.png.*skip_bad=True"):
        read_csv_pairs(path, size=10)
    with caplog.at_level(logging.WARNING):
        pairs = read_csv_pairs(path, size=10, skip_bad=True, workers=0)
    assert len(pairs) == 2 and pairs.skipped.count == 3
    assert "skipped 3 bad samples" in caplog.text and "empty caption" in caplog.text and "broken.png" in caplog.text
    # without skip_bad an unreadable image is found when decoded, named with its row
    no_missing = _csv(tmp_path, [r for r in rows if r[0] != "img/missing.png" and r[1].strip()], name="b.tsv")
    pairs = read_csv_pairs(no_missing, size=10, workers=0)
    with pytest.raises(DataError, match=r"b\.tsv: row 3: .*broken\.png: not a readable image"):
        list(pairs.batches(8, train=False))


def test_csv_with_no_usable_rows(tmp_path):
    path = _csv(tmp_path, [("img/none.png", "x")])
    with pytest.raises(DataError, match="no usable rows"):
        read_csv_pairs(path, size=8, skip_bad=True)


# ---------------------------------------------------------------------------------------------------------------
# webdataset shards


@pytest.fixture()
def shards(tmp_path) -> tuple[str, list[tuple[np.ndarray, str, int]]]:
    pairs = [(_image(i), f"caption {i}", i % 3) for i in range(10)]
    written = write_shards(pairs, tmp_path / "shards" / "part-%04d.tar", maxcount=4)
    assert [Path(w).name for w in written] == ["part-0000.tar", "part-0001.tar", "part-0002.tar"]
    return str(tmp_path / "shards" / "part-{0000..0002}.tar"), pairs


def test_shards_round_trip_in_order(shards):
    pattern, pairs = shards
    stream = ShardStream(pattern, size=10)
    assert stream.num_samples == 10  # from sizes.json
    images, captions, labels = _collect(stream.batches(3, train=False))
    assert captions == [c for _, c, _ in pairs]
    assert torch.equal(images, torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a, _, _ in pairs]))
    assert torch.cat(labels).tolist() == [lab for _, _, lab in pairs]


def test_shard_training_is_seeded_resumable_and_cut_into_steps(shards):
    pattern, _ = shards
    stream = ShardStream(pattern, size=10, shuffle_buffer=4)
    assert stream.steps_per_epoch(3) == 3
    full = list(stream.batches(3, epoch=1, seed=0, steps=7))  # more steps than one pass: the stream goes on
    assert len(full) == 7 and all(len(b.captions) == 3 for b in full)
    assert [b.captions for b in stream.batches(3, epoch=1, seed=0, steps=7)] == [b.captions for b in full]
    assert [b.captions for b in stream.batches(3, epoch=2, seed=0, steps=7)] != [b.captions for b in full]
    tail = list(stream.batches(3, epoch=1, seed=0, steps=7, start=4))
    assert [b.captions for b in tail] == [b.captions for b in full[4:]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(tail, full[4:]))
    first_pass = [c for b in full[:3] for c in b.captions]
    assert len(set(first_pass)) == 9  # one pass draws without repeats


def test_shard_training_with_loader_workers_resumes_exactly(shards):
    pattern, _ = shards
    stream = ShardStream(pattern, size=10, shuffle_buffer=4, workers=2)
    full = [b.captions for b in stream.batches(2, epoch=0, seed=3, steps=6)]
    assert len(full) == 6
    assert [b.captions for b in stream.batches(2, epoch=0, seed=3, steps=6, start=3)] == full[3:]
    assert stream.loader_workers(1) == 2  # each worker reads its own shards: 3 shards feed 2 on one rank, 1 on two
    assert stream.loader_workers(2) == 1
    with pytest.raises(DataError, match=r"3 shard\(s\) cannot feed 4 ranks"):
        next(iter(stream.batches(2, world=4)))


def test_ranks_read_disjoint_shards(shards):
    pattern, _ = shards
    stream = ShardStream(pattern, size=10)
    seen = [set(_collect(stream.batches(2, train=False, rank=r, world=2))[1]) for r in (0, 1)]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 10
    a = [set(c for b in stream.batches(2, epoch=0, rank=r, world=2, steps=2) for c in b.captions) for r in (0, 1)]
    assert not a[0] & a[1]


def _raw_shard(path: Path, samples: list[dict]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def _png(i: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(_image(i)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ({"txt": "no image"}, r"sample 'bad': no image \(expected one of jpg/jpeg/png/webp; members \['txt'\]\)"),
        ({"png": None}, r"sample 'bad': no caption \('txt' member"),
        ({"png": None, "txt": "  "}, r"sample 'bad': empty caption"),
        ({"jpg": b"garbage", "txt": "corrupt"}, r"sample 'bad'\.jpg: not a readable image"),
    ],
)
def test_bad_shard_samples_are_named_or_counted(tmp_path, caplog, sample, message):
    sample = {"__key__": "bad", **{k: (_png(0) if v is None else v) for k, v in sample.items()}}
    good = [{"__key__": f"g{i}", "png": _png(i), "txt": f"good {i}"} for i in range(3)]
    _raw_shard(tmp_path / "s.tar", [good[0], sample, *good[1:]])
    with pytest.raises(DataError, match=r"s\.tar: " + message + ".*skip_bad=True"):
        list(ShardStream(str(tmp_path / "s.tar"), size=10).batches(2, train=False))
    with caplog.at_level(logging.WARNING):
        got = _collect(ShardStream(str(tmp_path / "s.tar"), size=10, skip_bad=True).batches(2, train=False))[1]
    assert got == ["good 0", "good 1", "good 2"]
    assert "skipped 1 bad samples" in caplog.text and re.search(message, caplog.text)


def test_corrupt_or_missing_shards_are_named_or_skipped(shards, tmp_path, caplog):
    pattern, _ = shards
    folder = tmp_path / "shards"
    data = (folder / "part-0001.tar").read_bytes()
    (folder / "part-0001.tar").write_bytes(data[: len(data) // 3])  # cut short mid-sample
    with pytest.raises(DataError, match=r"part-0001\.tar: unreadable or corrupt shard"):
        list(ShardStream(pattern, size=10).batches(4, train=False))
    with caplog.at_level(logging.WARNING):
        got = _collect(ShardStream(pattern, size=10, skip_bad=True).batches(4, train=False))[1]
    assert got == [f"caption {i}" for i in (0, 1, 2, 3, 8, 9)]  # the truncated shard is left out whole
    assert "skipped 1 bad samples" in caplog.text and "truncated" in caplog.text
    garbage = np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes() + bytes(1024)
    (folder / "part-0001.tar").write_bytes(garbage)  # not a tar at all, though ending like one
    with pytest.raises(DataError, match=r"part-0001\.tar: unreadable or corrupt shard \(ReadError"):
        list(ShardStream(pattern, size=10).batches(4, train=False))
    with pytest.raises(DataError, match=r"part-0009\.tar: unreadable or corrupt shard \(FileNotFoundError"):
        list(ShardStream([str(folder / "part-0009.tar")], size=10).batches(4, train=False))


def test_all_bad_shards_end_training_with_an_error_not_a_loop(tmp_path):
    _raw_shard(tmp_path / "s.tar", [{"__key__": f"b{i}", "txt": "no image"} for i in range(3)])
    stream = ShardStream(str(tmp_path / "s.tar"), size=10, skip_bad=True, num_samples=3)
    with pytest.raises(DataError, match="a whole pass over the shards gave no usable sample"):
        next(iter(stream.batches(1)))
    (tmp_path / "s.tar").write_bytes(b"cut")  # no samples at all: the shard is skipped as corrupt
    with pytest.raises(DataError, match=r"its shards \[.*s\.tar'\] gave no sample in a whole pass \(1 bad\)"):
        next(iter(stream.batches(1)))


def test_shard_epoch_length_needs_sizes(tmp_path):
    _raw_shard(tmp_path / "s.tar", [{"__key__": "a", "png": _png(0), "txt": "x"}])
    with pytest.raises(DataError, match="number of samples in the shards is unknown"):
        next(iter(ShardStream(str(tmp_path / "s.tar"), size=10).batches(1)))
    assert len(list(ShardStream(str(tmp_path / "s.tar"), size=10).batches(1, steps=3))) == 3


def test_load_image_text_picks_the_source_by_path(shards, tmp_path):
    pattern, _ = shards
    data = load_image_text(pattern, img_size=10, workers=0)
    assert isinstance(data.train, ShardStream) and data.val is None
    with pytest.raises(DataError, match="not an image-text data set"):
        load_image_text(tmp_path / "x.json", img_size=10)


# ---------------------------------------------------------------------------------------------------------------
# zero-shot classification with a fake CLIP


def _tokenize(texts: list[str], context_length: int = 8) -> torch.Tensor:
    """Word ids: a class name word is 1 + its class, anything else 0 (padding)."""
    vocab = {w: i + 1 for i, w in enumerate(["alpha", "beta", "gamma", "delta"])}
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [vocab.get(w.strip(".,"), 0) for w in text.split()][:context_length]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class FakeClip(nn.Module):
    """Image features: the mean of each image quadrant; text features: an embedding bag of the word ids."""

    def __init__(self, text_perm: list[int] | None = None) -> None:
        super().__init__()
        weight = torch.zeros(5, 4)
        weight[1:] = torch.eye(4)[text_perm] if text_perm is not None else torch.eye(4)
        weight[0] = 0.05  # template words: a small shared direction
        self.text = nn.EmbeddingBag(5, 4, mode="sum", _weight=weight)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(100.0)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        quads = [x[..., :h, :w], x[..., :h, w:], x[..., h:, :w], x[..., h:, w:]]
        return torch.stack([q.mean(dim=(1, 2, 3)) for q in quads], dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)


def _quadrant_split(n: int = 40, size: int = 8) -> Split:
    """Class c: a bright quadrant c on a dark, noisy image."""
    rng = np.random.default_rng(0)
    labels = torch.arange(n) % 4
    images = torch.from_numpy(rng.integers(0, 40, (n, 3, size, size), dtype=np.uint8))
    h = size // 2
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        images[i, :, r * h : (r + 1) * h, q * h : (q + 1) * h] = 220
    return Split(labels, images=images)


CLASSES = ["alpha", "beta", "gamma", "delta"]
NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def test_zeroshot_classifier_averages_normalized_prompts():
    model = FakeClip()
    templates = ["a photo of a {}.", "a {}", lambda c: f"the {c} itself"]
    w = zeroshot_classifier(model, CLASSES, templates, _tokenize)
    assert w.shape == (4, 4) and torch.allclose(w.norm(dim=0), torch.ones(4))
    for c, name in enumerate(CLASSES):
        feats = model.encode_text(_tokenize([t.format(name) if isinstance(t, str) else t(name) for t in templates]))
        mean = torch.nn.functional.normalize(feats, dim=-1).mean(0)
        assert torch.allclose(w[:, c], mean / mean.norm(), atol=1e-6)
    assert torch.allclose(zeroshot_classifier(model, CLASSES, templates, _tokenize, classes_per_batch=3), w)


def test_zeroshot_separable_classes_score_full_marks():
    model = FakeClip()
    w = zeroshot_classifier(model, CLASSES, CIFAR10_TEMPLATES, _tokenize)
    split = _quadrant_split()
    out = evaluate_zeroshot(model, split, w, **NORM, batch_size=16)
    assert out == {"top1": 100.0, "top5": 100.0, "n": 40}  # top-5 is top-4 with 4 classes
    # any iterable of uint8 batches works, resized to img_size
    batches = split.sequential(7)
    assert evaluate_zeroshot(model, batches, w, **NORM, img_size=16)["top1"] == 100.0


def test_zeroshot_shuffled_text_scores_zero_and_random_features_chance():
    shuffled = FakeClip(text_perm=[1, 2, 3, 0])  # every class prompt points at another class's quadrant
    w = zeroshot_classifier(shuffled, CLASSES, ["a {}"], _tokenize)
    assert evaluate_zeroshot(shuffled, _quadrant_split(), w, **NORM)["top1"] == 0.0
    split = _quadrant_split(n=800)
    random_w = torch.nn.functional.normalize(torch.randn(4, 4), dim=0)
    split.labels = split.labels[torch.randperm(len(split))]  # labels unrelated to the images
    top1 = evaluate_zeroshot(shuffled, split, random_w, **NORM)["top1"]
    assert 15.0 < top1 < 35.0  # chance is 25%


def test_zeroshot_needs_classes_and_images():
    with pytest.raises(ValueError, match="needs class names and templates"):
        zeroshot_classifier(FakeClip(), [], ["a {}"], _tokenize)
    with pytest.raises(ValueError, match="no images"):
        evaluate_zeroshot(FakeClip(), [], torch.eye(4), **NORM)


@pytest.mark.slow
@pytest.mark.skipif(not (CIFAR / "train").is_dir(), reason="CIFAR-10 image folders not present")
def test_cifar10_folder_captions_use_its_class_names(tmp_path):
    data = load_image_text(CIFAR, img_size=32, val_per_class=10)
    assert "airplane" in data.classnames and len(data.classnames) == 10
    b = next(iter(data.val.batches(8, train=False)))
    assert all(any(name in c for name in data.classnames) for c in b.captions)
