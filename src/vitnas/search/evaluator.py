"""Accuracy of a subnet with weights inherited from the supernet, on the held-out validation split."""

from __future__ import annotations

import math

import numpy as np
import torch

from vitnas.data.augment import AugmentConfig, eval_transform
from vitnas.data.datasets import Split
from vitnas.evaluation import recalibrated_batchnorm, score_batches
from vitnas.search.defaults import eval_batch
from vitnas.search.run import merge_scores
from vitnas.space.arch import ArchConfig

__all__ = ["SplitHalves", "SupernetEvaluator", "stratified_parts"]


class SupernetEvaluator:
    """`evaluator(arch) -> {'top1', 'loss'}`, in inference mode. Small in-memory splits are normalized
    once and kept on the device. With `world` > 1 the split is sharded across ranks and `reduce` (an
    all-reduce sum) combines the counts. With `bilateral` (BCNet / ViTAS) a subnet's score is the mean of
    its left- and right-sliced evaluations. `amp_dtype` scores under autocast (None: fp32). `batch_size`
    defaults to the device's (`vitnas.search.defaults.eval_batch`). `calibration`: normalized training batches
    on which a supernet with BatchNorm re-estimates each path's statistics before scoring it
    (`vitnas.evaluation.calibration_batches`; None: scored with the shared statistics)."""

    def __init__(
        self,
        supernet: torch.nn.Module,
        split: Split,
        *,
        img_size: int,
        norm: AugmentConfig,
        batch_size: int | None = None,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world: int = 1,
        reduce=None,
        bilateral: bool = False,
        amp_dtype: torch.dtype | None = None,
        calibration: list[torch.Tensor] | None = None,
    ) -> None:
        self.bilateral = bilateral
        self.calibration = calibration
        self.net = supernet.to(device).eval()
        self.split = split
        self.device = torch.device(device)
        self.img_size, self.norm, self.batch_size = img_size, norm, batch_size or eval_batch(self.device)
        self.rank, self.world, self.reduce = rank, world, reduce
        self.amp_dtype = amp_dtype
        self._batches = None
        if split.images is not None:
            idx = torch.arange(len(split))[rank::world]
            x = eval_transform(split.images[idx].to(self.device), img_size, norm)
            y = split.labels[idx].to(self.device)
            b = self.batch_size
            self._batches = [(x[i : i + b], y[i : i + b]) for i in range(0, len(y), b)]

    def __call__(self, arch: ArchConfig) -> dict[str, float]:
        if not self.bilateral:
            return self._evaluate(arch, "left")
        left, right = self._evaluate(arch, "left"), self._evaluate(arch, "right")
        return {
            "top1": (left["top1"] + right["top1"]) / 2,
            "loss": (left["loss"] + right["loss"]) / 2,
            "top1_left": left["top1"],
            "top1_right": right["top1"],
        }

    def _evaluate(self, arch: ArchConfig, side: str) -> dict[str, float]:
        batches = self._batches
        if batches is None:
            batches = (
                (eval_transform(x.to(self.device), self.img_size, self.norm), y.to(self.device))
                for x, y in self.split.sequential(self.batch_size, self.rank, self.world)
            )
        with self.net.active(arch, side), recalibrated_batchnorm(self.net, self.calibration):
            r = score_batches(self.net, batches, self.reduce, self.amp_dtype)
        return {"top1": r["top1"], "loss": r["loss"]}

    def __len__(self) -> int:
        return len(self.split)

    def parts(self, fraction: float, seed: int = 0) -> tuple[SupernetEvaluator, SupernetEvaluator]:
        """Two evaluators over disjoint parts of the split, for successive halving: about `fraction` of
        every class's images (at least one, seeded choice) and the rest. Together they hold the split."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction={fraction}; expected a share of the validation split in (0, 1)")
        head, tail = stratified_parts(self.split.labels.numpy(), fraction, seed)
        if len(tail) == 0:
            raise ValueError(f"a split of {len(self.split)} images leaves nothing after a {fraction:g} share")
        kw = dict(
            img_size=self.img_size,
            norm=self.norm,
            batch_size=self.batch_size,
            device=self.device,
            rank=self.rank,
            world=self.world,
            reduce=self.reduce,
            bilateral=self.bilateral,
            amp_dtype=self.amp_dtype,
            calibration=self.calibration,
        )
        return (
            SupernetEvaluator(self.net, self.split.subset(head), **kw),
            SupernetEvaluator(self.net, self.split.subset(tail), **kw),
        )


class SplitHalves:
    """An evaluator's scores computed as two stratified halves of its split: the same metrics (up to float
    rounding) at the same cost, plus each half's top-1 as `val_halves`. How well the halves agree across
    candidates (split-half Kendall tau) says how reliably the scores rank archs."""

    def __init__(self, evaluator: SupernetEvaluator, seed: int = 0) -> None:
        self.a, self.b = evaluator.parts(0.5, seed)

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __call__(self, arch: ArchConfig) -> dict[str, float | list[float]]:
        ra, rb = self.a(arch), self.b(arch)
        return {**merge_scores(ra, len(self.a), rb, len(self.b)), "val_halves": [ra["top1"], rb["top1"]]}


def stratified_parts(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded `fraction` of each class (rounded up, so at least one) and of the rest, sorted."""
    rng = np.random.default_rng([seed, 8191])
    head = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        head.append(idx[: max(1, math.ceil(fraction * len(idx)))])
    head = np.sort(np.concatenate(head))
    return head, np.setdiff1d(np.arange(len(labels)), head)
