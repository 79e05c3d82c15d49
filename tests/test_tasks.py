"""The task interface: a method plugs in as one class, with several forward passes per step, its own
optimizer and its own tensors, all checkpointed and resumed exactly; the trainer restores process state."""

from __future__ import annotations

import pytest
import torch

from vitnas import ArchConfig
from vitnas.checkpoint import read_checkpoint
from vitnas.train import TrainConfig, Trainer, register_task
from vitnas.train.tasks import ArchTask, StepResult, soft_cross_entropy, task_names


@register_task("two_view_test")
class TwoViewTask(ArchTask):
    """Two forward passes (the batch and its mirror), a learned logit temperature with its own
    optimizer, and a count of images seen: everything a method may need, in a few lines."""

    def build_model(self, ctx, num_classes):
        self.log_t = torch.zeros((), requires_grad=True, device=ctx.device)
        self.seen = torch.zeros((), dtype=torch.long)
        return super().build_model(ctx, num_classes)

    def extra_optimizers(self, model):
        self.t_opt = torch.optim.Adam([self.log_t], lr=0.1)
        return {"temperature": self.t_opt}

    def loss(self, batch):
        self.t_opt.zero_grad()
        total = 0.0
        for x in (batch.images, batch.images.flip(-1)):
            loss = soft_cross_entropy(self.model(x) / self.log_t.exp(), batch.targets) / 2
            self.ctx.backward(loss)
            total += loss.detach()
        self.t_opt.step()
        self.seen += len(batch.labels)
        return StepResult(total, metrics={"temperature": float(self.log_t.detach().exp())})

    def state_tensors(self):
        return {"log_t": self.log_t.detach(), "seen": self.seen}

    def load_state_tensors(self, tensors, meta):
        with torch.no_grad():
            self.log_t.copy_(tensors["log_t"])
        self.seen = tensors["seen"].clone()


def _cfg(tmp_path, out, **kw):
    ArchConfig(48, 2, (2.0, 2.0), (2, 2)).to_yaml(tmp_path / "a.yaml")
    base = dict(task="two_view_test", arch=str(tmp_path / "a.yaml"), space="digits", recipe="digits")
    base.update(batch_size=64, val_per_class=20, epochs=1, ckpt_every=2, threads=1, deterministic=True)
    return TrainConfig(**{**base, **kw}, out_dir=str(tmp_path / out))


def test_plugged_in_task_checkpoints_and_resumes_its_own_state(tmp_path):
    assert "two_view_test" in task_names()
    infos = []
    full = Trainer(_cfg(tmp_path, "full", max_steps=4), progress=infos.append)
    full.fit()
    assert [i.step for i in infos] == [1, 2, 3, 4] and infos[-1].metrics["temperature"] != 1.0
    assert int(full.task.seen) == 4 * 64

    with pytest.raises(ValueError, match="max_steps=4; this run has max_steps=2"):  # a resume setting
        Trainer(_cfg(tmp_path, "full", max_steps=2), resume=True).fit()


def test_resume_restores_model_task_tensors_and_extra_optimizer_exactly(tmp_path):
    full = Trainer(_cfg(tmp_path, "full", max_steps=4, ckpt_every=2))
    full.fit()
    a, meta_a = read_checkpoint(tmp_path / "full" / "last.safetensors")

    # Interrupt after step 2 (its mid-epoch checkpoint), then resume in a fresh trainer.
    killed = Trainer(_cfg(tmp_path, "killed", max_steps=4, ckpt_every=2))
    original = killed.save
    killed.save = lambda path=None: (original(path), _stop() if killed.step == 2 else None)
    with pytest.raises(_Stop):
        killed.fit()
    resumed = Trainer(_cfg(tmp_path, "killed", max_steps=4, ckpt_every=2), resume=True)
    resumed.fit()
    b, meta_b = read_checkpoint(tmp_path / "killed" / "last.safetensors")
    assert meta_b["step"] == 4 and "temperature" in meta_b["optimizers"]
    for group in ("model", "optim", "optim_temperature", "task"):
        assert a[group].keys() == b[group].keys() and a[group], group
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), (group, key)
    assert int(b["task"]["seen"]) == 4 * 64


class _Stop(Exception):
    pass


def _stop():
    raise _Stop


def test_trainer_restores_threads_determinism_and_rng(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(123)
        want = torch.rand(3)
        torch.manual_seed(123)
        trainer = Trainer(_cfg(tmp_path, "r", max_steps=1))  # threads=1, deterministic=True
        trainer.fit()
        assert torch.get_num_threads() == 2
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.equal(torch.rand(3), want)  # the global RNG is where it was before the trainer
    finally:
        torch.set_num_threads(threads)
