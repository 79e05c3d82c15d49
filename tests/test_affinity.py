"""TinyCLIP affinity mimicking and CLIP's contrastive loss: their values against hand computations, their
minimum, and that two gloo ranks (gathered features, local loss) give the loss and gradients of one process
on the whole batch."""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vitnas.distill.affinity import (
    affinity_loss,
    affinity_losses,
    clip_loss,
    gather_feature,
    gather_features,
    tinyclip_loss,
)


def _features(n: int = 6, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(-1)
    return -(p * p.log()).sum(-1).mean()


def test_gather_is_identity_in_one_process():
    img, txt = _features()
    assert gather_feature(img) is img
    a, b = gather_features(img, txt, gather_with_grad=True)
    assert a is img and b is txt


def test_clip_loss_matches_a_hand_computation():
    img, txt = _features()
    scale = 20.0
    sim = scale * img @ txt.T
    i2t = -sum(math.log(sim[i].softmax(0)[i].item()) for i in range(6)) / 6
    t2i = -sum(math.log(sim[:, i].softmax(0)[i].item()) for i in range(6)) / 6
    assert clip_loss(img, txt, scale).item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)
    # matched pairs and a large scale: the loss goes to zero
    assert clip_loss(img, img, 1000.0).item() < 1e-3


def test_affinity_loss_at_the_teacher_is_its_entropy_with_zero_gradient():
    t_img, t_txt = _features(seed=1)
    s_img, s_txt = t_img.clone().requires_grad_(), t_txt.clone().requires_grad_()
    scale = torch.tensor(50.0)
    loss = affinity_loss(s_img, s_txt, scale, t_img, t_txt, scale)
    entropy = 0.5 * (_entropy(50.0 * t_img @ t_txt.T) + _entropy(50.0 * t_txt @ t_img.T))
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-5)
    loss.backward()
    assert s_img.grad.abs().max() < 1e-5 and s_txt.grad.abs().max() < 1e-5


def test_affinity_loss_is_higher_for_another_student_and_per_direction():
    t_img, t_txt = _features(seed=1)
    s_img, s_txt = _features(seed=2)
    at_teacher = affinity_loss(t_img, t_txt, 50.0, t_img, t_txt, 50.0)
    assert affinity_loss(s_img, s_txt, 50.0, t_img, t_txt, 50.0) > at_teacher + 0.1
    i2t, t2i = affinity_losses(s_img, s_txt, 30.0, t_img, t_txt, 50.0)
    target = (50.0 * t_img @ t_txt.T).softmax(-1)
    hand = -(target * (30.0 * s_img @ s_txt.T).log_softmax(-1)).sum(-1).mean()
    assert i2t.item() == pytest.approx(hand.item(), rel=1e-5) and t2i.item() > 0


def test_tinyclip_loss_mixes_affinity_and_contrastive_terms():
    t_img, t_txt = _features(seed=1)
    s_img, s_txt = _features(seed=2)
    soft = affinity_loss(s_img, s_txt, 50.0, t_img, t_txt, 50.0)
    hard = clip_loss(s_img, s_txt, 50.0)
    args = (s_img, s_txt, 50.0, t_img, t_txt, 50.0)
    assert torch.allclose(tinyclip_loss(*args), soft)
    assert torch.allclose(tinyclip_loss(*args, alpha=0.0, weight=2.0), 2.0 * hard)
    assert torch.allclose(tinyclip_loss(*args, alpha=0.25, weight=2.0), 0.5 * soft + 1.5 * hard)
    with pytest.raises(ValueError, match="alpha=1.5"):
        tinyclip_loss(*args, alpha=1.5)


def _loss(name: str, img: torch.Tensor, txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor) -> torch.Tensor:
    if name == "affinity":
        return affinity_loss(img, txt, 30.0, t_img, t_txt, 50.0)
    return clip_loss(img, txt, 30.0)


def _rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20)
    )
    try:
        s_img, s_txt = _features(8, 5, seed=2)
        t_img, t_txt = _features(8, 5, seed=1)
        mine = slice(rank * 4, rank * 4 + 4)
        results = {}
        for name in ("affinity", "clip"):
            img, txt = s_img[mine].clone().requires_grad_(), s_txt[mine].clone().requires_grad_()
            loss = _loss(name, img, txt, t_img[mine], t_txt[mine])
            loss.backward()
            results[name] = (loss.detach(), img.grad, txt.grad)
        # without gather_with_grad the value is the same (the gradient then misses other ranks' terms)
        results["no_grad_gather"] = clip_loss(s_img[mine], s_txt[mine], 30.0, gather_with_grad=False)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"out.{r}") for r in (0, 1)]
    s_img, s_txt = _features(8, 5, seed=2)
    t_img, t_txt = _features(8, 5, seed=1)
    for name in ("affinity", "clip"):
        img, txt = s_img.clone().requires_grad_(), s_txt.clone().requires_grad_()
        full = _loss(name, img, txt, t_img, t_txt)
        full.backward()
        # DDP averages over ranks: the mean of the local losses is the full loss, and each rank's feature
        # gradient (which gathers every rank's terms) over the world size is its rows of the full gradient
        assert (ranks[0][name][0] + ranks[1][name][0]).item() / 2 == pytest.approx(full.item(), rel=1e-5)
        for r in (0, 1):
            rows = slice(r * 4, r * 4 + 4)
            assert torch.allclose(ranks[r][name][1] / 2, img.grad[rows], atol=1e-6), name
            assert torch.allclose(ranks[r][name][2] / 2, txt.grad[rows], atol=1e-6), name
    no_grad = (ranks[0]["no_grad_gather"] + ranks[1]["no_grad_gather"]).item() / 2
    assert no_grad == pytest.approx(clip_loss(s_img, s_txt, 30.0).item(), rel=1e-5)
