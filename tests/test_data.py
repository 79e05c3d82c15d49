from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitnas.data import (
    BatchAugment,
    DataError,
    epoch_batches,
    holdout_split,
    load_data,
    load_digits,
    recipe,
    scan_image_folder,
)
from vitnas.data.folder import decode_images

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def make_folder(root: Path, split: str, classes: dict[str, int], size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")


def test_image_folder_round_trip(tmp_path):
    make_folder(tmp_path, "train", {"cat": 8, "dog": 6})
    make_folder(tmp_path, "test", {"cat": 2, "dog": 2})
    data = load_data(tmp_path, val_per_class=2, seed=0, cache_dir=tmp_path / "cache")
    assert data.classes == ["cat", "dog"] and data.image_size == 12
    assert len(data.train) == 10 and len(data.val) == 4 and len(data.test) == 4
    assert data.train.images.dtype == torch.uint8
    assert list((tmp_path / "cache").glob("*.safetensors"))  # decoded once, cached
    again = load_data(tmp_path, val_per_class=2, seed=0, cache_dir=tmp_path / "cache")
    assert torch.equal(again.train.images, data.train.images)


def test_missing_folders(tmp_path):
    with pytest.raises(DataError, match="nowhere: data folder not found"):
        load_data(tmp_path / "nowhere")
    make_folder(tmp_path, "train", {"cat": 3})
    with pytest.raises(DataError, match="no test split folder"):
        load_data(tmp_path, val_per_class=1)
    with pytest.raises(DataError, match="split folder not found"):
        scan_image_folder(tmp_path, "val")


def test_empty_class_folder(tmp_path):
    make_folder(tmp_path, "train", {"cat": 3})
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"train/dog: empty class folder"):
        scan_image_folder(tmp_path, "train")


def test_mismatched_classes_between_splits(tmp_path):
    make_folder(tmp_path, "train", {"cat": 3, "dog": 3})
    make_folder(tmp_path, "test", {"cat": 1, "fox": 1})
    with pytest.raises(DataError, match=r"missing \['dog'\], unexpected \['fox'\]"):
        load_data(tmp_path, val_per_class=1, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0 truncated jpeg", b"just some text"])
def test_corrupt_or_non_image_file(tmp_path, content):
    make_folder(tmp_path, "train", {"cat": 3, "dog": 3})
    make_folder(tmp_path, "test", {"cat": 1, "dog": 1})
    bad = tmp_path / "train" / "dog" / "broken.jpg"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=r"dog/broken.jpg: not a readable image"):
        load_data(tmp_path, val_per_class=1, cache_dir=tmp_path / "c")
    index = scan_image_folder(tmp_path, "train")
    images, labels = decode_images(index, skip_bad=True, workers=1)
    assert len(index.skipped) == 1 and "broken.jpg" in index.skipped[0]
    assert images.shape[0] == 6 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    data = load_data(tmp_path, val_per_class=1, skip_bad=True, cache_dir=tmp_path / "c")
    assert len(data.train) + len(data.val) == 6


def test_large_images_stream(tmp_path):
    make_folder(tmp_path, "train", {"a": 3, "b": 3}, size=80)
    make_folder(tmp_path, "test", {"a": 1, "b": 1}, size=80)
    data = load_data(tmp_path, img_size=64, val_per_class=1, workers=0)
    assert data.train.images is None and data.image_size == 73  # loaded at img_size / 0.875, cropped later
    batches = list(data.train.batches([np.array([0, 1]), np.array([2, 3])]))
    assert batches[0][0].shape == (2, 3, 73, 73) and batches[0][0].dtype == torch.uint8
    images, labels = data.train.take(np.array([3, 2]))  # in-process, as the loader's batch
    assert torch.equal(images, batches[1][0].flip(0)) and torch.equal(labels, batches[1][1].flip(0))
    first, second = data.train.digest(), load_data(tmp_path, img_size=64, val_per_class=1, workers=0).train.digest()
    assert first == second and first != data.val.digest()


def test_holdout_split_is_seeded_disjoint_and_balanced():
    labels = torch.arange(10).repeat_interleave(30)
    tr, va = holdout_split(labels, 5, seed=3)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 300
    assert np.bincount(labels[va].numpy()).tolist() == [5] * 10
    tr2, va2 = holdout_split(labels, 5, seed=3)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, holdout_split(labels, 5, seed=4)[1])
    with pytest.raises(DataError, match="too few to hold out 30"):
        holdout_split(labels, 30, seed=0)


def test_digits_default_has_disjoint_splits():
    data = load_digits()
    assert data.num_classes == 10 and data.train.images.shape[1:] == (3, 32, 32)
    assert len(data.val) == 200 and len(data.train) + len(data.val) + len(data.test) == 1797
    flat = lambda s: {bytes(x.numpy().tobytes()) for x in s.images}  # noqa: E731
    assert not (flat(data.val) & flat(data.test))


def test_digits_hold_out_what_is_asked_up_to_their_cap_and_checkpoints_get_their_split_back():
    from vitnas.data import load_data, load_data_of

    assert len(load_data(None, img_size=16, val_per_class=50).val) == 500
    assert len(load_data(None, img_size=16).val) == 500  # the folder default (100) is capped for the digits
    meta = {
        "config": {"data_path": None, "val_per_class": 100, "seed": 0},
        "img_size": 16,
        "classes": list("0123456789"),
    }
    assert len(load_data_of(meta).val) == 200  # saved before checkpoints recorded val_images: 20 per class then
    assert len(load_data_of({**meta, "val_images": 500}).val) == 500
    with pytest.raises(ValueError, match="holding out 200 validation images, the data now gives 500"):
        load_data_of({**meta, "val_images": 200})


def test_epoch_batches_shard_and_repeat():
    a = epoch_batches(100, 8, seed=0, epoch=1, rank=0, world=2)
    b = epoch_batches(100, 8, seed=0, epoch=1, rank=1, world=2)
    assert len(a) == len(b) == 6
    assert not set(np.concatenate(a)) & set(np.concatenate(b))
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(100, 8, seed=0, epoch=1, rank=0, world=2)]
    assert a[0].tolist() != epoch_batches(100, 8, seed=0, epoch=2, rank=0, world=2)[0].tolist()
    rep = np.concatenate(epoch_batches(90, 10, seed=0, epoch=0, repeats=3))
    assert len(rep) == 90 and np.bincount(rep).max() == 3  # same epoch length, images repeated


def test_batch_augment_targets():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    for name in ("deit", "cifar", "digits", "none"):
        aug = BatchAugment(recipe(name), 32, 10)
        x, y = aug(images, labels)
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
        torch.testing.assert_close(y.sum(1), torch.ones(16))
    x, y = BatchAugment(recipe("none").override(label_smoothing=0.1), 40, 10)(images, labels)
    assert y[0, 0].item() == pytest.approx(0.91) and y[0, 1].item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown augmentation key 'mixupp'"):
        recipe("deit").override(mixupp=1)


@pytest.mark.skipif(not CIFAR.is_dir(), reason="CIFAR-10 folders not available")
def test_cifar_folder_layout():
    index = scan_image_folder(CIFAR, "train")
    assert index.classes[:3] == ["airplane", "automobile", "bird"] and len(index) == 50_000
    index.paths, index.labels = index.paths[:64], index.labels[:64]
    images, _ = decode_images(index, workers=1)
    assert images.shape == (64, 3, 32, 32)


def test_non_image_files_are_skipped_and_counted_but_broken_images_are_named(tmp_path, caplog):
    make_folder(tmp_path, "train", {"cat": 3, "dog": 3})
    make_folder(tmp_path, "test", {"cat": 1, "dog": 1})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("labels are hard")
    (tmp_path / "train" / "dog" / "labels.csv").write_text("a,b")
    (tmp_path / "train" / "cat" / "Thumbs.db").write_bytes(b"\0\0")  # OS litter is ignored
    with caplog.at_level("WARNING"):
        data = load_data(tmp_path, val_per_class=1, cache_dir=tmp_path / "c")
    assert len(data.train) + len(data.val) == 6
    assert "skipped 2 files that are not images by their extension" in caplog.text
    index = scan_image_folder(tmp_path, "train")
    assert sorted(Path(p).name for p in index.not_images) == ["labels.csv", "notes.txt"]
    (tmp_path / "train" / "cat" / "broken.jpg").write_text("not a jpeg")  # claims to be an image: an error
    with pytest.raises(DataError, match=r"cat/broken.jpg: not a readable image"):
        load_data(tmp_path, val_per_class=1, cache_dir=tmp_path / "c2")
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"empty: no image files"):
        scan_image_folder(tmp_path, "train")


def test_digits_test_split_does_not_depend_on_the_seed():
    a, b = load_digits(seed=0), load_digits(seed=5)
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.val.images, b.val.images)
