"""Knowledge distillation from a frozen teacher: the losses, the teacher loader's checks, and KD
training end to end (checkpointed with its teacher, resumable, refusing changed settings)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitnas import ArchConfig
from vitnas.checkpoint import read_metadata
from vitnas.cli import main as cli_main
from vitnas.distill import hard_kd_loss, kd_loss, load_teacher, soft_kd_loss
from vitnas.export import export_subnet
from vitnas.models import VisionTransformer
from vitnas.train import TrainConfig, Trainer

TINY = dict(space="digits", recipe="digits", batch_size=64, val_per_class=20, threads=1, epochs=1)


def test_losses():
    torch.manual_seed(0)
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    y = F.one_hot(torch.randint(0, 5, (8,)), 5).float()
    ce = torch.sum(-y * F.log_softmax(s, -1), -1).mean()
    assert torch.allclose(kd_loss(s, t, y, kind="soft", alpha=0.0, tau=4.0), ce)
    assert soft_kd_loss(s, s, 2.0).abs() < 1e-6  # identical predictions: nothing to learn
    p_t, log_p_s = F.softmax(t / 2, -1), F.log_softmax(s / 2, -1)
    want = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4  # T^2 KL(p_t || p_s), batch mean
    assert torch.allclose(soft_kd_loss(s, t, 2.0), want, atol=1e-6)
    assert torch.allclose(hard_kd_loss(s, t), F.cross_entropy(s, t.argmax(-1)))
    mixed = kd_loss(s, t, y, kind="hard", alpha=0.25, tau=1.0)
    assert torch.allclose(mixed, 0.75 * ce + 0.25 * F.cross_entropy(s, t.argmax(-1)))
    with pytest.raises(ValueError, match="distill='medium'"):
        kd_loss(s, t, y, kind="medium", alpha=0.5, tau=1.0)


def _teacher_checkpoint(tmp_path):
    ArchConfig(96, 3, (3.0,) * 3, (3,) * 3).to_yaml(tmp_path / "t.yaml")
    cfg = TrainConfig(**TINY, task="subnet", arch=str(tmp_path / "t.yaml"), lr=4e-3, out_dir=str(tmp_path / "t"))
    Trainer(cfg).fit()
    return tmp_path / "t" / "last.safetensors"


def test_kd_training_checkpoints_its_teacher_resumes_and_keeps_the_teacher_frozen(tmp_path, capsys):
    teacher_ckpt = _teacher_checkpoint(tmp_path)
    ArchConfig(48, 2, (2.0,) * 2, (2,) * 2).to_yaml(tmp_path / "s.yaml")
    args = ["retrain", "--arch", str(tmp_path / "s.yaml"), "--teacher", str(teacher_ckpt), "--distill-alpha", "0.7"]
    args += ["--space", "digits", "--recipe", "digits", "--val-per-class", "20", "--epochs", "1", "--threads", "1"]
    args += ["--batch-size", "64", "--out-dir", str(tmp_path / "s")]
    assert cli_main(args) == 0
    meta = read_metadata(tmp_path / "s" / "last.safetensors")
    assert meta["task"] == "kd/arch" and meta["teacher"]["source"] == str(teacher_ckpt)
    assert meta["teacher"]["spec"]["kind"] == "vit" and len(meta["teacher"]["digest"]) == 64
    assert meta["config"]["distill"] == "soft" and meta["config"]["distill_alpha"] == 0.7
    assert cli_main(args + ["--resume"]) == 0  # finished: loads and stops
    capsys.readouterr()
    assert cli_main([*args[:-2], "--distill-alpha", "0.2", "--out-dir", str(tmp_path / "s"), "--resume"]) == 2
    assert "written by a run with distill_alpha=0.7; this run has distill_alpha=0.2" in capsys.readouterr().err

    cfg = TrainConfig(
        **TINY,
        task="subnet",
        arch=str(tmp_path / "s.yaml"),
        teacher=str(teacher_ckpt),
        max_steps=3,
        out_dir=str(tmp_path / "s2"),
    )
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.task.teacher.model.state_dict().items()}
    trainer.fit()
    after = trainer.task.teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.task.teacher.model.training
    assert not any(p.requires_grad for p in trainer.task.teacher.model.parameters())


def test_kd_loss_in_training_is_the_teacher_mix(tmp_path):
    """A step's loss is kd_loss of the student's and the teacher's logits on the same augmented batch."""
    teacher_ckpt = _teacher_checkpoint(tmp_path)
    ArchConfig(48, 2, (2.0,) * 2, (2,) * 2).to_yaml(tmp_path / "s.yaml")
    cfg = TrainConfig(
        **TINY,
        task="subnet",
        arch=str(tmp_path / "s.yaml"),
        teacher=str(teacher_ckpt),
        distill="hard",
        distill_alpha=1.0,
        drop_path=0.0,
        amp="off",  # the loss is recomputed here in fp32
        out_dir=str(tmp_path / "s"),
    )
    trainer = Trainer(cfg)
    seen = {}
    original = trainer.task.loss

    def spy(batch):
        seen["x"], seen["model"] = batch.images.clone(), {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return original(batch)

    trainer.task.loss = spy
    images, labels = next(trainer.data.train.batches(trainer.epoch_batches(0)[:1]))
    info = trainer.train_step(images, labels)
    student = VisionTransformer(**trainer.model.config)
    student.load_state_dict(seen["model"])
    with torch.no_grad():
        want = F.cross_entropy(student.train()(seen["x"]), trainer.task.teacher(seen["x"]).argmax(-1))
    assert info.loss == pytest.approx(float(want), rel=1e-5)


def test_teacher_must_fit_the_students_classes_and_input_size(tmp_path):
    def exported(name, num_classes, img_size):
        vit = VisionTransformer.from_arch(
            ArchConfig(48, 2, (2.0,) * 2, (2,) * 2),
            img_size=img_size,
            patch_size=4,
            num_classes=num_classes,
            head_dim=16,
            rel_pos_max=3,
        )
        return export_subnet(vit, tmp_path / name)

    ArchConfig(48, 2, (2.0,) * 2, (2,) * 2).to_yaml(tmp_path / "s.yaml")
    base = dict(**TINY, task="subnet", arch=str(tmp_path / "s.yaml"), out_dir=str(tmp_path / "s"))
    with pytest.raises(ValueError, match=r"teacher .*t3 predicts 3 classes, the student 10"):
        Trainer(TrainConfig(**base, teacher=str(exported("t3", 3, 16))))
    with pytest.raises(ValueError, match=r"teacher .*t32 takes 32x32 images, the student 16x16"):
        Trainer(TrainConfig(**base, teacher=str(exported("t32", 10, 32))))
    with pytest.raises(ValueError, match="give its trained weights"):
        load_teacher("efficientvit_m0", num_classes=10, img_size=32)
    with pytest.raises(ValueError, match="neither an exported folder, a checkpoint file nor a registered model"):
        load_teacher("no_such_model")
    with pytest.raises(ValueError, match="trains a supernet"):
        Trainer(TrainConfig(**{**TINY, "out_dir": str(tmp_path / "x")}, teacher=str(tmp_path / "t3")))


def test_registered_teacher_with_weights_of_other_classes_is_refused(tmp_path):
    import vitnas

    src = vitnas.create_model("efficientvit_m0", num_classes=1000, img_size=32)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"w.pth do not fit efficientvit_m0 with 10 classes \(skipped \['head"):
        load_teacher("efficientvit_m0", weights=str(tmp_path / "w.pth"), num_classes=10, img_size=32)
    teacher = load_teacher("efficientvit_m0", weights=str(tmp_path / "w.pth"), num_classes=1000, img_size=32)
    assert teacher.num_classes == 1000 and teacher.input_size == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), src.eval()(x))


def test_teacher_in_bfloat16_returns_float32_logits_close_to_the_float32_teacher(tmp_path):
    vit = VisionTransformer.from_arch(
        ArchConfig(48, 2, (2.0,) * 2, (2,) * 2), img_size=16, patch_size=4, num_classes=10, head_dim=16, rel_pos_max=3
    )
    folder = export_subnet(vit, tmp_path / "t")
    full, half = load_teacher(str(folder)), load_teacher(str(folder), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    x = torch.randn(4, 3, 16, 16)
    a, b = full(x), half(x)
    assert b.dtype == torch.float32 and not b.requires_grad
    torch.testing.assert_close(b, a, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="teacher_dtype='int8'"):
        load_teacher(str(folder), dtype="int8")


def test_teacher_auto_runs_fp32_weights_under_the_amp_auto_precision(tmp_path, monkeypatch):
    """`auto` keeps fp32 weights and autocasts to what amp `auto` picks: bf16 on a CPU with native bf16, fp32
    on one without (then bit-equal to the float32 teacher)."""
    import vitnas.distill.teacher as teacher_mod

    vit = VisionTransformer.from_arch(
        ArchConfig(48, 2, (2.0,) * 2, (2,) * 2), img_size=16, patch_size=4, num_classes=10, head_dim=16, rel_pos_max=3
    )
    folder = export_subnet(vit, tmp_path / "t")
    full, auto = load_teacher(str(folder), dtype="float32"), load_teacher(str(folder))
    assert next(auto.model.parameters()).dtype == torch.float32
    x = torch.randn(4, 3, 16, 16)
    monkeypatch.setattr(teacher_mod, "amp_dtype", lambda mode, device: None)
    assert auto.compute_dtype() == "float32"
    torch.testing.assert_close(auto(x), full(x), atol=0, rtol=0)
    monkeypatch.setattr(teacher_mod, "amp_dtype", lambda mode, device: torch.bfloat16)
    assert auto.compute_dtype() == "bfloat16"
    y = auto(x)
    assert y.dtype == torch.float32 and not torch.equal(y, full(x))
    torch.testing.assert_close(y, full(x), atol=0.1, rtol=0.05)
