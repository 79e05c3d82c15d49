"""CLIP training tasks (`clip`, `tinyclip`) on the bundled digits with tiny models: training, zero-shot
evaluation, the affinity loss at its minimum, exact resume after a kill, automatic inheritance and pruning, CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open

import vitnas
from vitnas.cli import main as cli_main
from vitnas.data.datasets import load_digits
from vitnas.data.tokenizer import tokenize
from vitnas.models.clip import CLIP
from vitnas.models.spec import load_model
from vitnas.train import TrainConfig, Trainer, read_checkpoint
from vitnas.train.tasks import Batch, resolve_task
from vitnas.train.tasks.clip import TinyClipTask, masks_of_checkpoint, prune_checkpoint

BASE = dict(
    img_size=16,  # the digits are 8 x 8 images: 16 px loses nothing and costs a quarter of 32 px
    recipe="digits",
    batch_size=64,
    val_per_class=20,
    lr=2e-2,
    warmup_epochs=0.5,
    weight_decay=0.1,
    threads=1,
    deterministic=True,
    amp="off",
    ckpt_every=4,
    log_every=2,
)
CLIP_OPTS = {"context_length": 12}
HALF = {"vision": {"layers": 1}, "text": {"layers": 1}}  # half the depth of clip_tiny
AUTO = {**CLIP_OPTS, "auto": True, "target_sparsity": 0.5, "sparsity_warmup": 0, "mask_lr": 0.3}


CLIPS = vitnas.list_models("*clip*")


def config(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**BASE, "out_dir": str(out), **kw})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A clip_tiny trained for one epoch by the clip task (its checkpoint)."""
    out = tmp_path_factory.mktemp("teacher")
    Trainer(config(out, task="clip", model="clip_tiny", epochs=1, clip=CLIP_OPTS)).fit()
    return out / "last.safetensors"


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, teacher) -> Path:
    """An uninterrupted tinyclip run with automatic inheritance (the student: the teacher, masked): 30 steps,
    11 of them in the second epoch; its out_dir."""
    out = tmp_path_factory.mktemp("auto")
    Trainer(config(out, task="tinyclip", teacher=str(teacher), epochs=2, max_steps=30, clip=AUTO)).fit()
    return out


def first_batch(trainer: Trainer) -> Batch:
    index = trainer.epoch_batches(0)[0]
    images, labels = trainer.data.train.take(index)
    torch.manual_seed(0)
    x, targets = trainer.augment(images, labels, index, 0)
    return Batch(x, targets, labels, index, 0, 0)


def test_clip_task_learns_and_scores_zero_shot(tmp_path):
    losses = []
    trainer = Trainer(
        config(tmp_path, task="clip", model="clip_tiny", epochs=4, warmup_epochs=1, eval_every=4, clip=CLIP_OPTS),
        progress=lambda info: losses.append(info.loss),
    )
    assert trainer.aug_cfg.mixup == 0 and trainer.aug_cfg.mean == vitnas.models.clip.CLIP_MEAN
    result = trainer.fit()
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    last = result["history"][-1]
    assert 30 < last["val_top1"] <= last["val_top5"] <= 100  # chance: 10%
    meta = read_checkpoint(tmp_path / "last.safetensors", only=())[1]
    assert meta["model"]["kind"] == "clip" and meta["clip"]["classnames"][0] == "zero"
    assert meta["clip"]["templates"][0] == "a photo of the number {}."
    model, _ = load_model(tmp_path / "last.safetensors")
    assert model.logit_scale.item() <= np.log(100) + 1e-6


def test_captions_follow_index_epoch_and_seed(tmp_path):
    trainer = Trainer(config(tmp_path, task="clip", model="clip_tiny", epochs=1, clip=CLIP_OPTS))
    task, batch = trainer.task, first_batch(trainer)
    a = task.caption_tokens(batch)
    assert torch.equal(a, task.caption_tokens(batch))  # a pure function of (index, epoch, seed)
    later = Batch(batch.images, batch.targets, batch.labels, batch.index, 1, 30)
    assert not torch.equal(a, task.caption_tokens(later))  # another epoch, other wordings
    text = task.classnames[int(batch.labels[0])]
    row = tokenize([t.format(text) for t in task.templates], 12)
    assert any(torch.equal(a[0], r) for r in row)  # the caption is a prompt of the image's class


def test_affinity_loss_of_a_teacher_copy_is_the_teacher_entropy(tmp_path, teacher):
    """Student = teacher (inherited with the teacher's own config): the loss is the entropy of the teacher's
    affinity softmax, its minimum, so every gradient vanishes."""
    cfg = config(tmp_path, task="tinyclip", model="clip_tiny", teacher=str(teacher), epochs=1, clip=CLIP_OPTS)
    trainer = Trainer(cfg)
    task = trainer.task
    assert isinstance(task, TinyClipTask) and isinstance(resolve_task(cfg), TinyClipTask)  # not wrapped in KD
    batch = first_batch(trainer)
    loss = task.loss(batch).loss
    with torch.no_grad():
        img, txt, scale = task.teacher(batch.images, task.caption_tokens(batch))
        logits = scale * img @ txt.T
        entropy = [-(F.softmax(x, -1) * F.log_softmax(x, -1)).sum(-1).mean() for x in (logits, logits.T)]
    torch.testing.assert_close(loss, 0.5 * (entropy[0] + entropy[1]), rtol=1e-5, atol=1e-6)
    grads = [p.grad.abs().max() for p in trainer.model.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-4


def test_tinyclip_inherits_and_trains_a_half_size_student(tmp_path, teacher):
    losses = []
    cfg = config(
        tmp_path, task="tinyclip", model="clip_tiny", model_args=HALF, teacher=str(teacher), epochs=1, clip=CLIP_OPTS
    )
    trainer = Trainer(cfg, progress=lambda info: losses.append(info.loss))
    t_sd, s_sd = trainer.task.teacher.state_dict(), trainer.model.state_dict()
    assert torch.equal(s_sd["visual.conv1.weight"], t_sd["visual.conv1.weight"].to(s_sd["visual.conv1.weight"]))
    result = trainer.fit()
    assert np.isfinite(losses).all()
    assert {"val_top1", "teacher_val_top1"} <= set(result["history"][-1])
    meta = read_checkpoint(tmp_path / "last.safetensors", only=())[1]
    assert meta["teacher"]["source"] == str(teacher) and meta["model"]["config"]["vision"]["layers"] == 1


def test_tinyclip_config_errors(tmp_path, teacher):
    with pytest.raises(ValueError, match="set teacher"):
        Trainer(config(tmp_path, task="tinyclip", model="clip_tiny"))
    with pytest.raises(ValueError, match="set model"):
        Trainer(config(tmp_path, task="tinyclip", teacher=str(teacher)))
    with pytest.raises(ValueError, match="not a CLIP"):
        Trainer(config(tmp_path, task="clip", model="deit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="clip: unknown key 'alfa'"):
        Trainer(config(tmp_path, task="tinyclip", model="clip_tiny", teacher=str(teacher), clip={"alfa": 1}))
    with pytest.raises(ValueError, match="exceeds the text tower"):
        Trainer(config(tmp_path, task="clip", model="clip_tiny", clip={"context_length": 100}))


def test_auto_inheritance_moves_masks_to_the_target_and_prunes_exactly(tmp_path, teacher, auto_run):
    history = read_checkpoint(auto_run / "last.safetensors", only=())[1]["history"]
    sparsity = [h["expected_sparsity"] for h in history]
    # from ~0 towards the target 0.5 (and past it: the one-sided Lagrangian does not pull back; with 0.3, 15 times
    # the reference's mask lr, momentum carries the masks on for several steps)
    assert 0.1 < sparsity[0] < sparsity[-1]
    assert history[-1]["params_kept"] < 0.95
    model, masks, _ = masks_of_checkpoint(auto_run / "last.safetensors")
    out = prune_checkpoint(auto_run / "last.safetensors", tmp_path / "stage1")
    pruned, meta = load_model(out)
    assert isinstance(pruned, CLIP) and meta["model"]["kind"] == "clip"
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
    images, tokens = torch.randn(3, 3, 16, 16), tokenize(["a one.", "the digit two.", "a 3"], 12)
    with torch.no_grad():
        for a, b in zip(pruned(images, tokens), model(images, tokens, masks.deterministic())):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # the next progressive stage starts from the pruned student (its architecture and weights)
    nxt = config(
        tmp_path / "stage2", task="tinyclip", teacher=str(teacher), pretrained=str(out), max_steps=2, clip=AUTO
    )
    trainer = Trainer(nxt)
    assert trainer.model.config == pruned.config
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in trainer.model.state_dict().items())


def ckpt_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["vitnas"])["step"]
    except Exception:
        return None


class Interrupt(Exception):
    pass


def test_interrupted_clip_run_resumes_bit_identically(tmp_path):
    """Stopped mid-way through the second epoch (all state lost but the files), then resumed: weights, optimizer
    and history equal an uninterrupted run's. (tinyclip: the kill -9 test below.)"""
    kw = dict(task="clip", model="clip_tiny", epochs=2, max_steps=24, clip=CLIP_OPTS)
    Trainer(config(tmp_path / "full", **kw)).fit()

    def stop(info):
        if info.step == 22:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(config(tmp_path / "cut", **kw), progress=stop).fit()
    assert ckpt_step(tmp_path / "cut" / "last.safetensors") == 20  # the last checkpoint before the stop
    Trainer(config(tmp_path / "cut", **kw), resume=True).fit()
    a, meta_a = read_checkpoint(tmp_path / "full" / "last.safetensors")
    b, meta_b = read_checkpoint(tmp_path / "cut" / "last.safetensors")
    for group in ("model", "optim"):
        assert a[group].keys() == b[group].keys() and a[group], group
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), (group, key)
    assert meta_a["history"] == meta_b["history"] and meta_b["step"] == 24


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, teacher, auto_run):
    """A real kill -9 of `vitnas train-clip --method tinyclip` with automatic inheritance mid-way through the
    second epoch, then --resume: the masks, multipliers, weights, both optimizers and the history equal those of
    the uninterrupted (in-process) run."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "teacher": str(teacher), "epochs": 2, "max_steps": 30, "clip": AUTO}))
    args = [sys.executable, "-m", "vitnas.cli", "train-clip", "--method", "tinyclip", "--config", str(cfg)]
    proc = subprocess.Popen(
        [*args, "--out-dir", "killed"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and (ckpt_step(tmp_path / "killed" / "last.safetensors") or 0) < 20:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt_step(tmp_path / "killed" / "last.safetensors")
    assert killed_at is not None and 19 < killed_at < 30
    resumed = subprocess.run(
        [*args, "--out-dir", "killed", "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, meta_a = read_checkpoint(auto_run / "last.safetensors")
    b, meta_b = read_checkpoint(tmp_path / "killed" / "last.safetensors")
    for group in ("model", "optim", "optim_masks", "task"):
        assert a[group].keys() == b[group].keys() and a[group], group
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), (group, key)
    assert meta_a["history"] == meta_b["history"] and meta_b["step"] == 30


def test_cli_train_evaluate_zero_shot_and_prune(tmp_path, teacher, capsys):
    common = [
        "--img-size",
        "16",
        "--recipe",
        "digits",
        "--batch-size",
        "32",
        "--val-per-class",
        "10",
        "--threads",
        "1",
        "--amp",
        "off",
    ]
    code = cli_main(
        ["train-clip", "--method", "clip", "--model", "clip_tiny", "--max-steps", "3", "--epochs", "1"]
        + ["--clip", "context_length=12", "--out-dir", str(tmp_path / "c"), *common]
    )
    assert code == 0
    assert cli_main(["evaluate-zeroshot", str(tmp_path / "c" / "last.safetensors"), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "test split of digits" in out and "top1 %" in out
    code = cli_main(
        ["train-clip", "--method", "tinyclip", "--teacher", str(teacher), "--max-steps", "3", "--epochs", "1"]
        + ["--clip", "auto=true", "--clip", "context_length=12", "--out-dir", str(tmp_path / "t"), *common]
    )
    assert code == 0 and (tmp_path / "t" / "pruned.safetensors").is_file()
    assert cli_main(["prune-clip", str(tmp_path / "t" / "last.safetensors"), "--out", str(tmp_path / "p")]) == 0
    assert "parameters" in capsys.readouterr().out
    assert cli_main(["evaluate-zeroshot", str(tmp_path / "p" / "pruned.safetensors"), "--templates", "digits"]) == 0
    assert cli_main(["prune-clip", str(tmp_path / "c" / "last.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "nothing to prune" in capsys.readouterr().err


def test_clip_trains_on_csv_pairs_and_scores_its_eval_data(tmp_path, capsys):
    """A .csv of (image, caption) rows (open_clip's layout) through the task's load_data hook: captions come from
    the file by row; zero-shot evaluation runs on `eval_data`."""
    from PIL import Image

    digits = load_digits(16, val_per_class=5)
    rows = ["filepath,title"]
    for i in range(96):
        image, label = digits.train.take(np.array([i]))
        Image.fromarray(image[0].permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a handwritten {label.item()} number {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    seen = []
    cfg = config(
        tmp_path / "run",
        task="clip",
        model="clip_tiny",
        data_path=str(tmp_path / "pairs.csv"),
        batch_size=32,
        epochs=1,
        workers=0,
        val_per_class=5,
        clip={**CLIP_OPTS, "eval_data": "digits"},
    )
    trainer = Trainer(cfg)
    assert len(trainer.data.train) == 96 and trainer.steps_per_epoch == 3 and trainer.data.classes[0] == "0"
    batch = first_batch(trainer)
    i = int(batch.index[0])
    assert torch.equal(
        trainer.task.caption_tokens(batch)[0], tokenize([f"a handwritten {digits.train.labels[i]} number {i}"], 12)[0]
    )
    trainer.progress = seen.append
    history = trainer.fit()["history"]
    assert len(seen) == 3 and "val_top1" in history[-1]
    assert cli_main(["evaluate-zeroshot", str(tmp_path / "run" / "last.safetensors")]) == 0
    assert "val split of digits" in capsys.readouterr().out
    no_eval = config(
        tmp_path / "plain",
        task="clip",
        model="clip_tiny",
        data_path=str(tmp_path / "pairs.csv"),
        batch_size=32,
        epochs=1,
        workers=0,
        clip=CLIP_OPTS,
    )
    assert Trainer(no_eval).fit()["history"][-1] == {"epoch": 1, "step": 3}


@pytest.mark.parametrize(
    "name",
    [n if n in ("clip_tiny", "tinyclip_vit_8m_16_text_3m") else pytest.param(n, marks=pytest.mark.slow) for n in CLIPS],
)
def test_every_registered_clip_model_runs_and_trains(name):
    """The CLIP counterpart of test_registry's classifier check: at 32 px with 8-token captions, both towers
    give finite normalised features and every parameter gets a gradient from the contrastive loss."""
    torch.manual_seed(0)
    patch = 16 if "_16" in name else 32 if "_32" in name else 4
    model = vitnas.create_model(name, vision={"image_size": 2 * patch}, text={"context_length": 8})
    img, txt, scale = model(torch.randn(2, 3, 2 * patch, 2 * patch), tokenize(["a cat.", "a dog."], 8))
    assert img.shape == txt.shape == (2, model.config.embed_dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    logits = scale * img @ txt.T
    (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_clip_trains_on_streamed_shards_and_resumes_exactly(tmp_path, capsys):
    """Webdataset shards as the training data: captions stream with each batch (no index), an epoch is the
    samples of sizes.json over the batch, and a run stopped mid-epoch resumes to the uninterrupted run's weights
    (the stream restarts at the checkpoint's batch, loader workers included)."""
    from vitnas.data.image_text import write_shards

    digits = load_digits(16, val_per_class=5)
    images, labels = digits.train.take(np.arange(96))
    captions = [f"a handwritten {int(y)} number {i}" for i, y in enumerate(labels)]
    write_shards(zip(images, captions, labels.tolist()), tmp_path / "shards" / "part-%04d.tar", maxcount=24)
    seen: list[list[str]] = []

    def record(batch):  # the captions each step trains on
        seen.append(batch.extras["captions"])

    kw = dict(
        task="clip",
        model="clip_tiny",
        data_path=str(tmp_path / "shards" / "part-{0000..0003}.tar"),
        batch_size=16,
        epochs=2,
        workers=2,
        val_per_class=5,
        clip={**CLIP_OPTS, "eval_data": "digits", "shuffle_buffer": 8},
    )
    full = Trainer(config(tmp_path / "full", **kw))
    assert full.steps_per_epoch == 6 and full.data.name == "shards" and len(full.data.train) == 96
    loss = full.task.loss
    full.task.loss = lambda batch: (record(batch), loss(batch))[1]
    full.fit()
    assert len(seen) == 12 and all(len(c) == 16 for c in seen)
    first_epoch = [c for batch in seen[:6] for c in batch]
    assert sorted(first_epoch) == sorted(captions)  # one pass: every pair once
    assert seen[6:] != seen[:6]  # the next epoch is reshuffled
    i = int(seen[0][0].split()[-1])
    assert int(seen[0][0].split()[2]) == int(labels[i])

    def stop(info):
        if info.step == 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(config(tmp_path / "cut", **kw), progress=stop).fit()
    assert ckpt_step(tmp_path / "cut" / "last.safetensors") == 8  # mid second epoch
    resumed = Trainer(config(tmp_path / "cut", **kw), resume=True)
    seen.clear()
    loss = resumed.task.loss
    resumed.task.loss = lambda batch: (record(batch), loss(batch))[1]
    resumed.fit()
    assert len(seen) == 4
    a, meta_a = read_checkpoint(tmp_path / "full" / "last.safetensors")
    b, meta_b = read_checkpoint(tmp_path / "cut" / "last.safetensors")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert meta_a["history"] == meta_b["history"] and "val_top1" in meta_b["history"][-1]
    assert cli_main(["evaluate-zeroshot", str(tmp_path / "cut" / "last.safetensors")]) == 0
    assert "val split of digits" in capsys.readouterr().out


DDP_SHARDS = """
import json, sys, torch
from safetensors.torch import save_file
from vitnas.data.datasets import Split
from vitnas.train import Trainer, TrainConfig
out, shards = sys.argv[1], sys.argv[2]
cfg = TrainConfig(task="clip", model="clip_tiny", data_path=shards, img_size=16, recipe="digits", batch_size=8,
                  epochs=1, val_per_class=5, lr=2e-2, threads=1, workers=1, ckpt_every=1000, out_dir=out,
                  clip={"context_length": 12, "eval_data": "digits"})
trainer = Trainer(cfg)
seen, loss = [], trainer.task.loss
trainer.task.loss = lambda batch: (seen.extend(batch.extras["captions"]), loss(batch))[1]
scored, sequential = [], Split.sequential
def counted(self, *args):  # the validation images this rank scores
    for images, labels in sequential(self, *args):
        scored.append(len(labels))
        yield images, labels
Split.sequential = counted
result = trainer.fit()
rank = trainer.dist.rank
json.dump({"captions": seen, "history": result["history"], "scored": sum(scored)}, open(f"{out}/rank{rank}.json", "w"))
save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
"""


def test_torchrun_two_ranks_train_on_disjoint_shards_and_shard_zero_shot_evaluation(tmp_path):
    """2 ranks on 4 shards: each reads its own shards (disjoint captions), the weights stay equal, and the
    zero-shot validation score, each rank scoring half the images, equals one process scoring them all."""
    from safetensors.torch import load_file

    from vitnas.data.image_text import write_shards
    from vitnas.models.clip import CLIP_MEAN, CLIP_STD
    from vitnas.zeroshot import evaluate_zeroshot, zeroshot_classifier

    digits = load_digits(16, val_per_class=5)
    images, labels = digits.train.take(np.arange(64))
    pairs = [(im, f"a handwritten {int(y)} number {i}", int(y)) for i, (im, y) in enumerate(zip(images, labels))]
    write_shards(pairs, tmp_path / "shards" / "part-%04d.tar", maxcount=16)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SHARDS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [*cmd, str(tmp_path), str(tmp_path / "shards" / "part-{0000..0003}.tar")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [len(x["captions"]) for x in runs] == [32, 32]  # 64 samples / (8 x 2 ranks) = 4 steps of 8 each
    assert not set(runs[0]["captions"]) & set(runs[1]["captions"])
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert runs[0]["history"] == runs[1]["history"]
    assert [x["scored"] for x in runs] == [25, 25]  # each rank scores half of the 50 validation images
    model, meta = load_model(tmp_path / "last.safetensors")
    clip = meta["clip"]
    tok = lambda texts: tokenize(texts, clip["context_length"])  # noqa: E731
    classifier = zeroshot_classifier(model, clip["classnames"], clip["templates"], tok)
    one = evaluate_zeroshot(model, digits.val, classifier, mean=CLIP_MEAN, std=CLIP_STD, img_size=16)
    assert runs[0]["history"][-1]["val_top1"] == pytest.approx(one["top1"])


def test_cli_progressive_stages_chain_pruned_students_with_relative_targets(tmp_path, teacher, capsys):
    """`train-clip --progressive 0.3 0.6`: stage 1 masks the teacher towards 0.3, stage 2 starts from stage 1's
    pruned model with the target that leaves 0.4 of the *teacher's* prunable parameters; a rerun with --resume
    passes over the finished stages."""
    from vitnas.checkpoint import read_metadata
    from vitnas.train.tasks.clip import clip_config_of, prunable_params, stage_target

    args = ["train-clip", "--method", "tinyclip", "--teacher", str(teacher), "--progressive", "0.3", "0.6"]
    args += ["--img-size", "16", "--recipe", "digits", "--batch-size", "32", "--val-per-class", "10"]
    args += ["--threads", "1", "--epochs", "1", "--max-steps", "12", "--out-dir", str(tmp_path)]
    args += ["--clip", "context_length=12", "--clip", "sparsity_warmup=0", "--clip", "mask_lr=0.3"]
    assert cli_main(args) == 0
    t_cfg = clip_config_of(teacher)
    assert clip_config_of("clip_tiny") == vitnas.create_model("clip_tiny").config  # registered: no weights built
    pruned = [tmp_path / f"stage{k}" / "pruned.safetensors" for k in (1, 2)]
    metas = [read_metadata(tmp_path / f"stage{k}" / "last.safetensors")["config"] for k in (1, 2)]
    assert metas[0]["pretrained"] is None and metas[0]["clip"]["target_sparsity"] == pytest.approx(0.3)
    assert metas[1]["pretrained"] == str(pruned[0])
    expected = stage_target(t_cfg, clip_config_of(pruned[0]), 0.6)
    assert metas[1]["clip"]["target_sparsity"] == pytest.approx(expected, abs=1e-6)
    kept = [prunable_params(clip_config_of(p)) / prunable_params(t_cfg) for p in pruned]
    assert 1.0 > kept[0] > kept[1]  # each stage pruned further
    assert expected == pytest.approx(1 - 0.4 / kept[0])
    assert "pruned student of the last stage" in capsys.readouterr().out
    lasts = [tmp_path / f"stage{k}" / "last.safetensors" for k in (1, 2)]
    mtimes = [p.stat().st_mtime_ns for p in lasts]
    assert cli_main([*args, "--resume"]) == 0  # finished stages: nothing trains or saves again
    assert [p.stat().st_mtime_ns for p in lasts] == mtimes
    assert read_metadata(lasts[1])["config"]["pretrained"] == str(pruned[0])
    assert cli_main([*args[:6], "0.6", "0.3", *args[8:], "--out-dir", str(tmp_path / "bad")]) == 2
    assert "must rise" in capsys.readouterr().err
