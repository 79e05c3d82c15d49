"""MiniViT weight distillation: the relation losses against the reference's formulas, feature capture on
weight-multiplexed and plain blocks, layer maps, and one MiniViTTask step of a tiny Mini-DeiT learning a
DeiT teacher of another width, depth and head count (every student weight gets a gradient)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import vitnas
from vitnas.distill.relations import (
    align_tokens,
    attention_relation_kl,
    attention_relation_loss,
    auto_layer_map,
    capture_features,
    hidden_relation_loss,
    parse_layer_pairs,
    relation_losses,
    resolve_layer_map,
)
from vitnas.distill.teacher import Teacher
from vitnas.export import export_subnet
from vitnas.train import TrainConfig
from vitnas.train.tasks import Batch, RegistryTask, TaskContext
from vitnas.train.tasks.minivit import MiniViTTask

STUDENT = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=4, num_heads=3, repeats=2)


def mini_deit(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return vitnas.create_model("mini_deit_tiny_patch16_224", **{**STUDENT, **kw})


def deit(patch_size: int = 8) -> torch.nn.Module:
    """A DeiT of another width (q/k/v 64), depth (3) and head count (2) than the student."""
    torch.manual_seed(1)
    return vitnas.create_model(
        "deit_tiny_patch16_224",
        img_size=32,
        patch_size=patch_size,
        num_classes=10,
        embed_dim=64,
        depth=3,
        num_heads=2,
        head_dim=32,
    )


class TinyMiniDeiT(RegistryTask):
    """The registry task with a Mini-DeiT narrow and shallow enough for a unit test."""

    def build_model(self, ctx, num_classes):
        return mini_deit(num_classes=num_classes, drop_path_rate=self.cfg.drop_path)


def make_task(tmp_path, teacher: torch.nn.Module, **kw) -> MiniViTTask:
    folder = export_subnet(teacher, tmp_path / "teacher")
    cfg = TrainConfig(
        task="registry",
        model="mini_deit_tiny_patch16_224",
        img_size=32,
        teacher=str(folder),
        distill="minivit",
        drop_path=0.0,
        out_dir=str(tmp_path / "run"),
        **kw,
    )
    task = MiniViTTask(cfg, TinyMiniDeiT(cfg))
    task.prepare_data(SimpleNamespace(num_classes=10))
    ctx = TaskContext(
        device=torch.device("cpu"),
        amp_dtype=None,
        backward=lambda loss: loss.backward(),
        evaluate=lambda model, arch=None: {"top1": 0.0, "loss": 0.0, "n": 0},
    )
    task.model, task.ctx = task.build_model(ctx, 10), ctx
    return task


def batch(n: int = 4) -> Batch:
    torch.manual_seed(2)
    labels = torch.randint(0, 10, (n,))
    return Batch(torch.randn(n, 3, 32, 32), F.one_hot(labels, 10).float(), labels, None, 0, 0)


# -- the reference's losses (microsoft/Cream MiniViT/Mini-Swin/main.py), for comparison ---------------
def reference_relation_loss(student_qkv, teacher_qkv, Ar):
    loss = 0.0
    for s_att, t_att in zip(student_qkv, teacher_qkv):
        (B, N, Cs), Ct = s_att[0].shape, t_att[0].shape[-1]
        for i in range(3):
            for j in range(3):
                mi = s_att[i].view(B, N, Ar, Cs // Ar).transpose(1, 2) / (Cs / Ar) ** 0.5
                As = mi @ s_att[j].view(B, N, Ar, Cs // Ar).permute(0, 2, 3, 1)
                mi = t_att[i].view(B, N, Ar, Ct // Ar).transpose(1, 2) / (Ct / Ar) ** 0.5
                At = mi @ t_att[j].view(B, N, Ar, Ct // Ar).permute(0, 2, 3, 1)
                loss += torch.sum(-F.softmax(At, -1) * F.log_softmax(As, -1), -1).mean()
    return loss / (9.0 * len(student_qkv))


def reference_hidden_loss(student, teacher, scale):
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return torch.mean((s @ s.transpose(-1, -2) - t @ t.transpose(-1, -2)) ** 2) * scale


def relation_entropy(qkv, heads):
    """Mean row entropy of softmax(X_i X_j^T / sqrt(C / heads)) over the 9 (i, j) pairs."""
    B, N, C3 = qkv.shape
    x = qkv.float().view(B, N, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
    total = 0.0
    for i in range(3):
        for j in range(3):
            p = F.softmax(x[i] @ x[j].transpose(-1, -2) / (C3 // 3 // heads) ** 0.5, -1)
            total += -(p * p.log()).sum(-1).mean()
    return total / 9


def test_losses_equal_the_reference_formulas_across_widths():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3 * 12), torch.randn(2, 5, 3 * 20)  # q/k/v widths 12 and 20
    want = reference_relation_loss([s.chunk(3, -1)], [t.chunk(3, -1)], Ar=2)
    assert torch.allclose(attention_relation_loss(s, t, heads=2), want, atol=1e-6)
    kl = attention_relation_kl(s, t, heads=2)
    assert torch.allclose(kl, want - relation_entropy(t, 2), atol=1e-5) and kl > 0
    hs, ht = torch.randn(2, 5, 12), torch.randn(2, 5, 20)
    assert torch.allclose(hidden_relation_loss(hs, ht), reference_hidden_loss(hs, ht, 5), atol=1e-6)
    assert torch.allclose(hidden_relation_loss(hs, ht, scale=49), reference_hidden_loss(hs, ht, 49), atol=1e-6)
    with pytest.raises(ValueError, match="width 12 is not divisible by distill_relation_heads=5"):
        attention_relation_loss(s, t, heads=5)


def test_a_copy_of_the_teacher_has_zero_hidden_loss_and_zero_attention_kl():
    student = mini_deit()
    teacher = Teacher(copy.deepcopy(student), source="copy", digest=None)
    x = batch().images
    with torch.no_grad(), capture_features(teacher.model) as tf:
        teacher.model(x)
    with capture_features(student.train()) as sf:
        student(x)
    pairs = auto_layer_map(4, 4)
    assert pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]
    attn, hidden = relation_losses(sf, tf, pairs, heads=3)
    assert hidden.abs() < 1e-6
    for s, t in pairs:
        assert attention_relation_kl(sf.qkv[s], tf.qkv[t], heads=3).abs() < 1e-6
    entropy = sum(relation_entropy(tf.qkv[t], 3) for _, t in pairs) / len(pairs)
    assert torch.allclose(attn, entropy, atol=1e-5) and attn > 0.1  # the CE is the entropy, not 0
    assert all(v.requires_grad for v in (*sf.qkv.values(), *sf.hidden.values()))
    assert not any(v.requires_grad for v in (*tf.qkv.values(), *tf.hidden.values()))


def test_capture_follows_the_multiplexed_call_order_and_removes_its_hooks():
    model = mini_deit().eval()
    x = batch(2).images
    with torch.no_grad(), capture_features(model, layers={1, 2}) as f:
        model(x)
    with torch.no_grad():  # the layers by hand, outside the capture
        h = model.patch_embed(x) + model.pos_embed
        for g, group in enumerate(model.blocks):
            for r in range(group.repeats):  # layer g * repeats + r
                qkv = group.block.attn.qkv(group.block.norm1[r](h))
                h = group.block(h, r, model.grid)
                if g * group.repeats + r in (1, 2):
                    assert torch.allclose(f.hidden[g * group.repeats + r], h, atol=1e-6)
                    assert torch.allclose(f.qkv[g * group.repeats + r], qkv, atol=1e-6)
    assert sorted(f.hidden) == sorted(f.qkv) == [1, 2]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    vit = deit()
    with torch.no_grad(), capture_features(vit) as f:
        vit(x)
    assert f.layout.prefix == 1 and f.qkv[0].shape == (2, 17, 3 * 64)
    for i in (1, 2):  # vitnas Attention runs qkv functionally: the capture recomputes it from the input
        block = vit.blocks[i]
        assert torch.allclose(f.qkv[i], block.attn.qkv(block.norm1(f.hidden[i - 1])), atol=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in vit.modules())
    with pytest.raises(ValueError, match="Mini-DeiT and VisionTransformer .* got a Sequential"):
        capture_features(torch.nn.Sequential(torch.nn.Linear(2, 2))).__enter__()
    with pytest.raises(RuntimeError, match="capture one forward at a time"), capture_features(model):
        model(x), model(x)


def test_one_step_from_a_copy_reports_zero_hidden_loss_and_the_entropy(tmp_path):
    task = make_task(tmp_path, mini_deit(num_classes=10), distill_relation_heads=3)
    assert task.name == "minivit/registry" and task.pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]
    b = batch()
    with torch.no_grad(), capture_features(task.teacher.model) as tf:
        task.teacher.model(b.images)
    r = task.loss(b)
    assert r.metrics["hidden"] == pytest.approx(0.0, abs=1e-6)
    entropy = sum(float(relation_entropy(tf.qkv[t], 3)) for _, t in task.pairs) / 4
    assert r.metrics["attn"] == pytest.approx(entropy, rel=1e-5)


def test_a_step_trains_every_student_weight_from_a_deit_of_another_shape(tmp_path):
    task = make_task(tmp_path, deit(), distill_relation_heads=2, distill_alpha=0.5, distill_tau=2.0)
    assert task.pairs == [(0, 0), (1, 1), (2, 1), (3, 2)]  # auto: 4 student layers on 3, last with last
    assert "distill_layers" in task.resume_keys and "model" in task.resume_keys
    teacher_before = {k: v.clone() for k, v in task.teacher.model.state_dict().items()}
    r = task.loss(batch())
    m = r.metrics
    assert torch.isfinite(r.loss) and all(v > 0 for v in m.values())
    want = 0.5 * m["label"] + 0.5 * m["kd"] + 1.0 * m["attn"] + 0.1 * m["hidden"]
    assert float(r.loss) == pytest.approx(want, rel=1e-5)
    params = [(n, p) for n, p in task.model.named_parameters() if p.requires_grad]
    assert len(params) > 20
    missing = [n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert all(p.grad is None for p in task.teacher.model.parameters())
    assert all(torch.equal(v, task.teacher.model.state_dict()[k]) for k, v in teacher_before.items())
    assert task.checkpoint_meta()["distill_layers"] == [[0, 0], [1, 1], [2, 1], [3, 2]]
    explicit = make_task(tmp_path / "x", deit(), distill_layers="0:1,3:2")
    assert explicit.pairs == [(0, 1), (3, 2)] and torch.isfinite(explicit.loss(batch()).loss)


def test_layer_maps():
    assert auto_layer_map(12, 12) == [(i, i) for i in range(12)]
    for ls, lt in ((4, 12), (12, 4), (6, 7), (3, 1), (1, 5)):
        pairs = auto_layer_map(ls, lt)
        assert [s for s, _ in pairs] == list(range(ls)) and pairs[-1] == (ls - 1, lt - 1)
        assert all(0 <= t < lt for _, t in pairs) and [t for _, t in pairs] == sorted(t for _, t in pairs)
    assert resolve_layer_map("auto", 4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert resolve_layer_map("0:1,3:5", 4, 6) == [(0, 1), (3, 5)]
    assert resolve_layer_map(" 0:1 , 3:5 ", 4, 6) == [(0, 1), (3, 5)]
    with pytest.raises(ValueError, match=r"distill_layers='4:1': student layer 4 is out of range 0\.\.3"):
        resolve_layer_map("4:1", 4, 6)
    with pytest.raises(ValueError, match=r"distill_layers='0:1,1:6': teacher layer 6 is out of range 0\.\.5"):
        resolve_layer_map("0:1,1:6", 4, 6)
    with pytest.raises(ValueError, match=r"teacher layer -1 is out of range"):
        resolve_layer_map("0:-1", 4, 6)
    for bad in ("0-1", "a:b", "0:1:2", "0:1,", "1"):
        with pytest.raises(ValueError, match=f"distill_layers={bad!r}: .* is not a 'student:teacher' pair"):
            parse_layer_pairs(bad)
    with pytest.raises(ValueError, match="distill_layers=''; expected 'auto'"):
        parse_layer_pairs("")
    with pytest.raises(ValueError, match="the pair 0:1 is given twice"):
        parse_layer_pairs("0:1,0:1")
    cfg = TrainConfig(
        task="registry", model="mini_deit_tiny_patch16_224", teacher="t", distill="minivit", distill_layers="x"
    )
    with pytest.raises(ValueError, match="distill_layers='x'"):  # at construction, before any model is built
        MiniViTTask(cfg, TinyMiniDeiT(cfg))


def test_token_count_mismatch_is_refused(tmp_path):
    s, t = torch.randn(2, 16, 8), torch.randn(2, 65, 8)  # 16 patches vs a class token + 64 patches
    with pytest.raises(
        ValueError, match=r"the student has 16 patch tokens \(16 tokens\), the teacher 64 \(65 tokens\)"
    ):
        align_tokens(s, t, student_prefix=0, teacher_prefix=1)
    a, b = align_tokens(s, torch.randn(2, 17, 8), student_prefix=0, teacher_prefix=1)  # the class token goes
    assert a.shape[1] == b.shape[1] == 16
    with pytest.raises(ValueError, match=r"\(batch, tokens\) \(2, 16\), the teacher's \(2, 17\)"):
        hidden_relation_loss(s, torch.randn(2, 17, 8))
    with pytest.raises(ValueError, match="the student has 16 patch tokens, the teacher 64"):
        make_task(tmp_path, deit(patch_size=4))  # 8x8 patches of 4 pixels against the student's 4x4 of 8


def test_cli_retrain_with_minivit_distillation_records_the_layer_map(tmp_path, capsys):
    from vitnas import ArchConfig
    from vitnas.checkpoint import read_metadata
    from vitnas.cli import main as cli_main
    from vitnas.models import VisionTransformer

    torch.manual_seed(0)
    arch = ArchConfig(96, 3, (2.0,) * 3, (3,) * 3)
    teacher = VisionTransformer.from_arch(arch, img_size=16, patch_size=4, num_classes=10)
    folder = export_subnet(teacher, tmp_path / "teacher")
    ArchConfig(48, 2, (2.0,) * 2, (2,) * 2).to_yaml(tmp_path / "s.yaml")
    args = ["retrain", "--arch", str(tmp_path / "s.yaml"), "--teacher", str(folder), "--distill", "minivit"]
    args += ["--space", "digits", "--recipe", "digits", "--val-per-class", "20", "--max-steps", "3", "--threads", "1"]
    args += ["--batch-size", "32", "--out-dir", str(tmp_path / "s")]
    assert cli_main(args) == 0
    meta = read_metadata(tmp_path / "s" / "last.safetensors")
    assert meta["task"] == "minivit/arch" and meta["distill_layers"] == [[0, 1], [1, 2]]
    assert meta["teacher"]["source"] == str(folder)
    capsys.readouterr()
    assert cli_main([*args[:-2], "--distill-layers", "0:3", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "teacher layer 3 is out of range 0..2" in capsys.readouterr().err
    no_teacher = [a for a in args[:-2] if a not in ("--teacher", str(folder))]
    assert cli_main([*no_teacher, "--out-dir", str(tmp_path / "bad2")]) == 2
    assert "distill 'minivit' distils a live teacher's attention" in capsys.readouterr().err
