"""TinyViT-style stored teacher logits: per-image replayable augmentation, the store format, saving
(resumable after kill -9, identical on 1 and 2 gloo ranks), and training from a store (the loss equals
online distillation with the same top-K; mismatched stores are refused naming the field)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vitnas import ArchConfig
from vitnas.cli import main as cli_main
from vitnas.data import load_digits, recipe
from vitnas.data.replay import ReplayAugment, mix_partners, replay_from_split, sample_seeds
from vitnas.distill.logit_store import LogitStore, dense_targets, record_dtype
from vitnas.export import export_subnet
from vitnas.models import VisionTransformer
from vitnas.train import TrainConfig, Trainer
from vitnas.train.save_logits import SaveLogitsConfig, save_logits
from vitnas.train.tasks import soft_cross_entropy

# A recipe with every batched replayed op: crop, flip, erasing, mixup and cutmix (RandAugment, replayed
# image by image, is tested on its own to keep the store tests fast).
MIXING = dict(hflip=0.5, erase_prob=0.5, mixup=0.8, cutmix=1.0, mix_prob=0.8)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = VisionTransformer.from_arch(
        ArchConfig(48, 2, (2.0,) * 2, (2,) * 2), img_size=16, patch_size=4, num_classes=10
    )
    return export_subnet(model, tmp_path_factory.mktemp("teacher") / "t")


def _save_cfg(teacher, out, **kw):
    base = dict(teacher=str(teacher), out=str(out), val_per_class=20, recipe="cifar", augment=MIXING, epochs=2)
    return SaveLogitsConfig(**{**base, "topk": 4, "threads": 1, "chunk_size": 300, "batch_size": 128, **kw})


@pytest.fixture(scope="module")
def store(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    save_logits(_save_cfg(teacher_dir, out))
    return out


def test_replay_does_not_depend_on_the_batch():
    data = load_digits(16, val_per_class=20)
    cfg = recipe("cifar").override(**MIXING, randaugment_n=2)
    aug = ReplayAugment(cfg, 16, 10)
    n = len(data.train)
    seeds, partners = sample_seeds(3, 1, n), mix_partners(3, 1, n)
    assert partners.tolist() != list(range(n)) and (partners != np.arange(n)).all()
    big, small = np.arange(0, 40), np.array([31, 5, 17])

    def run(index):
        images, labels = next(iter(data.train.batches([index])))
        p = partners[index]
        return replay_from_split(aug, data.train, index, images, labels, seeds[index], p, seeds[p])

    x_big, y_big = run(big)
    x_small, y_small = run(small)
    assert torch.equal(x_big[small], x_small) and torch.equal(y_big[small], y_small)
    mixed = [p.mix for p in aug.params(seeds[big], 16, 16)]
    assert {"mixup", "cutmix", "none"} <= set(mixed)  # every branch ran in this batch
    other = sample_seeds(3, 2, n)[small]  # another epoch: other images
    x_other, _ = replay_from_split(
        aug, data.train, small, *next(iter(data.train.batches([small]))), other, partners[small], other
    )
    assert not torch.equal(x_other, x_small)


def test_dense_targets_spread_the_rest_evenly():
    idx = torch.tensor([[2, 0], [1, 3]])
    val = torch.tensor([[0.5, 0.3], [0.9, 0.2]])  # the second row sums to > 1 (fp16 rounding can do this)
    d = dense_targets(idx, val, 5)
    assert torch.allclose(d[0], torch.tensor([0.3, 0.2 / 3, 0.5, 0.2 / 3, 0.2 / 3]))
    assert torch.allclose(d[1], torch.tensor([0.0, 0.9, 0.0, 0.2, 0.0]))
    assert record_dtype(100, 1000).itemsize == 404 and record_dtype(10, 10).itemsize == 44
    assert record_dtype(5, 40000).itemsize == 4 + 5 * 4 + 5 * 2  # wider indices past 32,767 classes


def test_store_layout_manifest_and_records(store, teacher_dir):
    s = LogitStore(store)
    m = s.manifest
    assert s.epochs == 2 and m["topk"] == 4 and m["record_bytes"] == 4 * 4 + 4 and m["index_dtype"] == "int16"
    assert sorted(p.name for p in store.iterdir()) == ["epoch_0000.bin", "epoch_0001.bin", "manifest.json"]
    assert (store / "epoch_0000.bin").stat().st_size == m["num_samples"] * 20
    assert m["teacher"]["source"] == str(teacher_dir) and len(m["teacher"]["digest"]) == 64
    assert m["data"]["images"] == m["num_samples"] and m["augment"]["mixup"] == 0.8
    seeds, idx, val = s.lookup(1, np.array([7, 0, 7]))
    assert seeds.tolist() == sample_seeds(0, 1, m["num_samples"])[[7, 0, 7]].tolist()
    assert torch.equal(idx[0], idx[2]) and (val[:, :-1] >= val[:, 1:]).all()  # sorted descending


def _student_cfg(store, out, **kw):
    ArchConfig(48, 2, (2.0,) * 2, (2,) * 2).to_yaml(Path(out).parent / "student.yaml")
    base = dict(task="subnet", arch=str(Path(out).parent / "student.yaml"), space="digits", recipe="cifar")
    base.update(augment=MIXING, val_per_class=20, epochs=2, batch_size=64, threads=1, out_dir=str(out))
    return TrainConfig(**{**base, "distill_logits": str(store), "distill_alpha": 1.0, **kw})


def test_store_loss_equals_online_distillation_on_the_replayed_batch(store, teacher_dir, tmp_path):
    """The trainer's step from the store = soft CE against the dense top-K of the teacher run live on
    the very images the student saw (fp16 rounding apart)."""
    from vitnas.distill import load_teacher

    trainer = Trainer(_student_cfg(store, tmp_path / "run"))
    teacher = load_teacher(str(teacher_dir))
    index = trainer.epoch_batches(1)[0]
    images, labels = next(iter(trainer.data.train.batches([index])))
    x, _ = trainer.augment(images, labels, index, 1)
    probs = torch.softmax(teacher(x), -1)
    val, idx = probs.topk(4, -1)
    online = dense_targets(idx, val.half(), 10)
    from vitnas.train.tasks import Batch

    batch = Batch(x, None, labels, index, 1, 0)
    stored = trainer.task.teacher_targets(batch)
    assert torch.allclose(stored, online, atol=1e-3)
    logits = trainer.model(x)
    assert torch.allclose(soft_cross_entropy(logits, stored), soft_cross_entropy(logits, online), atol=1e-3)
    assert trainer.task.store_epoch(1) == 1


def test_training_from_the_store_records_it_and_refuses_mismatches(store, teacher_dir, tmp_path, capsys):
    trainer = Trainer(_student_cfg(store, tmp_path / "run", max_steps=3))
    trainer.fit()
    meta = json.loads(json.dumps(trainer.task.checkpoint_meta()))
    assert meta["distill_logits"]["topk"] == 4 and meta["distill_logits"]["teacher"]["source"] == str(teacher_dir)
    assert trainer.task.name == "stored-logits/arch"
    checks = [
        (dict(val_per_class=19), "the store covers other training images"),
        (dict(augment={**MIXING, "mixup": 0.5}), "augment.mixup=0.8, this run.s recipe has augment.mixup=0.5"),
        (dict(epochs=3), "epochs=2 stored, this run trains epochs=3"),
        (dict(img_size=24), "the store was made with img_size=16, this run has img_size=24"),
        (dict(teacher=str(tmp_path / "student.yaml")), "not by teacher="),
        (dict(augment={**MIXING, "repeats": 2}), "repeats=2"),
    ]
    for change, message in checks:
        with pytest.raises(ValueError, match=message):
            Trainer(_student_cfg(store, tmp_path / "bad", **change))
    reuse = Trainer(_student_cfg(store, tmp_path / "reuse", epochs=3, reuse_epochs=True))
    assert [reuse.task.store_epoch(e) for e in range(3)] == [0, 1, 0]
    claimed = Trainer(_student_cfg(store, tmp_path / "claimed", teacher=str(teacher_dir)))  # the right teacher
    assert claimed.task.store.epochs == 2
    with pytest.raises(ValueError, match="topk"):  # continuing a store with another K
        save_logits(_save_cfg(teacher_dir, store, topk=3))


def _digest_of_store(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def _save_in_rank(rank: int, world: int, init_file: str, cfg: SaveLogitsConfig) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        save_logits(cfg)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_write_the_same_store_as_one(store, teacher_dir, tmp_path):
    import torch.multiprocessing as mp

    cfg = _save_cfg(teacher_dir, tmp_path / "two")
    mp.start_processes(_save_in_rank, args=(2, str(tmp_path / "init"), cfg), nprocs=2, start_method="spawn")
    assert _digest_of_store(tmp_path / "two") == _digest_of_store(store)


def test_saving_resumes_after_kill_9_without_redoing_a_chunk(store, teacher_dir, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "vitnas.cli", "save-logits", "--teacher", str(teacher_dir), "--out", str(out)]
    args += ["--val-per-class", "20", "--recipe", "cifar", "--epochs", "2", "--topk", "4", "--threads", "1"]
    args += ["--chunk-size", "300", "--batch-size", "128"]
    for key, value in MIXING.items():
        args += ["--augment", f"{key}={value}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("epoch_*.part/chunk_*.bin"))) >= 2 or (out / "epoch_0000.bin").exists():
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("epoch_*.part/chunk_*.bin"))) + 5 * len(list(out.glob("epoch_*.bin")))
    assert 0 < done_before < 10, "the kill should land after a chunk and before the end"
    result = save_logits(_save_cfg(teacher_dir, out))
    assert result["chunks_written"] == 10 - done_before  # 2 epochs x 5 chunks, none redone
    assert not list(out.glob("**/*.tmp*")) and _digest_of_store(out) == _digest_of_store(store)


def test_cli_save_logits_then_retrain_from_the_store(teacher_dir, tmp_path, capsys):
    out = tmp_path / "cli-store"
    args = ["save-logits", "--teacher", str(teacher_dir), "--out", str(out), "--val-per-class", "20"]
    args += ["--recipe", "digits", "--epochs", "1", "--topk", "3", "--threads", "1"]
    assert cli_main(args) == 0
    assert "1 epochs x 1238 images, top-3 of 10 classes, 16 bytes per record" in capsys.readouterr().out
    ArchConfig(48, 2, (2.0,) * 2, (2,) * 2).to_yaml(tmp_path / "s.yaml")
    train = ["retrain", "--arch", str(tmp_path / "s.yaml"), "--space", "digits", "--recipe", "digits"]
    train += ["--val-per-class", "20", "--epochs", "1", "--threads", "1", "--batch-size", "64"]
    train += ["--distill-logits", str(out), "--out-dir", str(tmp_path / "s")]
    assert cli_main(train) == 0
    assert cli_main([*train[:-2], "--epochs", "2", "--out-dir", str(tmp_path / "s2")]) == 2
    assert "--reuse-epochs" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "s" / "last.safetensors"), "--out", str(tmp_path / "x"), "--onnx"]) == 0
    assert (tmp_path / "x" / "model.onnx").is_file()
