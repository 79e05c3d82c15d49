"""Cream (NeurIPS'20): supernet training with prioritized paths, on any supernet (MBConv or ViT).

Each step trains one sampled path. After `start_epoch` epochs of plain training the best paths seen so far
fill a board (K entries ranked by training-batch top-1 and MACs); each step then distils the sampled path
from the board path that a meta-matching network picks, with loss (m * KD + (2 - m) * CE) / 2. Every
`meta_every` steps the meta network is updated by a one-step look-ahead: the student's weights after a
simulated SGD step on the (m-weighted) KD loss must lower the label loss on other images. The board's
paths are the search result (`vitnas search` with `strategy: board`), or seed an evolution.

Where this differs from the reference (microsoft/Cream `Cream/lib`), on purpose:
- m = sigmoid(w) of the *chosen* entry (the reference takes sigmoid(-w) of the last entry scored, #78), so
  the entry matched best is both the teacher and the most trusted one.
- The look-ahead is exact: the label loss is taken at w' = w - lr * g through `functional_call` (the
  reference steps the real weights and backpropagates into the stem weight only), and the meta network is
  updated by it alone: the step's own loss sees m detached.
- A board entry keeps its own path's soft labels (the reference stores the teacher's once the board fills)
  and a path already on the board replaces its old entry instead of taking a second slot.
- Paths may be restricted to a MACs window (`min_mmacs` / `max_mmacs`, as for uniform supernet training),
  by rejection sampling; the reference samples freely and uses FLOPs only to rank the board.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from vitnas._config import check_fields, check_range, from_known_keys
from vitnas.train.tasks.base import Batch, StepResult, TaskContext, register_task, soft_cross_entropy
from vitnas.train.tasks.supernet import SupernetTask, sample_step_archs

__all__ = ["Board", "BoardEntry", "CreamConfig", "CreamTask", "lookahead_meta_grads", "match_teacher"]

log = logging.getLogger(__name__)

PICKS = ("meta", "top1")


@dataclass
class CreamConfig:
    board_size: int = 10  # K: prioritized paths kept (reference POOL_SIZE 10)
    start_epoch: int = 1  # epochs of plain label training before the board and distillation start (ref. 20 of 120)
    pick: str = "meta"  # teacher choice: meta (meta-matching network) | top1 (the board's best path)
    slice: int = 4  # images a board entry keeps, and images per look-ahead half (reference SLICE 4)
    meta_every: int = 200  # steps between meta-network updates (reference UPDATE_ITER 200)
    meta_lr: float = 1e-4  # SGD lr of the meta network (reference META_LR)
    lookahead_lr: float = 0.01  # lr of the simulated student step in the look-ahead
    acc_gap: float = 5.0  # a full board takes a path this many top-1 points above its worst (reference 5)

    def __post_init__(self) -> None:
        source = "cream"
        check_fields(self, source)
        for name in ("board_size", "slice", "meta_every"):
            check_range(source, name, getattr(self, name), 1)
        check_range(source, "start_epoch", self.start_epoch, 0)
        for name in ("meta_lr", "lookahead_lr", "acc_gap"):
            check_range(source, name, getattr(self, name), 0.0)
        if self.pick not in PICKS:
            raise ValueError(f"cream: pick={self.pick!r}; expected one of {PICKS}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CreamConfig:
        return from_known_keys(cls, data, "cream")


@dataclass
class BoardEntry:
    """One prioritized path: its training-batch top-1 when it entered, its MACs, and `slice` images with the
    path's softmax on them (what the meta network compares a student against)."""

    arch: Any
    top1: float
    macs: int
    images: torch.Tensor
    probs: torch.Tensor

    def rank_key(self) -> tuple[float, int]:
        return (self.top1, self.macs)


class Board:
    """The prioritized path board, with the reference's rule: a path enters when the board has room, when
    its top-1 beats the worst entry's by more than `acc_gap`, or when it beats it at fewer MACs. Entries are
    kept in descending (top-1, MACs) order, so equal top-1 puts the larger path first (as the reference's
    tuple sort), and the list is cut to `size`."""

    def __init__(self, size: int, acc_gap: float = 5.0) -> None:
        self.size, self.acc_gap = size, acc_gap
        self.entries: list[BoardEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def admits(self, top1: float, macs: int) -> bool:
        if len(self.entries) < self.size:
            return True
        worst = self.entries[-1]
        return top1 > worst.top1 + self.acc_gap or (top1 > worst.top1 and macs < worst.macs)

    def offer(self, entry: BoardEntry) -> bool:
        """Insert `entry` if the rule admits it; True when it entered."""
        if not self.admits(entry.top1, entry.macs):
            return False
        self.entries = [e for e in self.entries if e.arch != entry.arch] + [entry]
        self.entries.sort(key=BoardEntry.rank_key, reverse=True)
        del self.entries[self.size :]
        return True

    def archs(self) -> list[Any]:
        return [e.arch for e in self.entries]

    def describe(self) -> list[dict[str, Any]]:
        """The board as JSON (what checkpoints carry and `strategy: board` reads)."""
        return [{"arch": e.arch.to_dict(), "top1": e.top1, "macs": e.macs} for e in self.entries]


def match_teacher(
    model: nn.Module, meta: nn.Linear, board: Board, student: Any, *, pick: str
) -> tuple[torch.Tensor, BoardEntry]:
    """The board entry to distil `student` from, and its matching score m in (0, 1) (differentiable in the
    meta network and the student's weights). `meta`: the student's softmax on an entry's images minus the
    entry's stored softmax, flattened, to one score per entry; the highest scores wins."""
    if pick == "top1":
        return torch.tensor(0.5, device=board.entries[0].images.device), board.entries[0]
    scores = []
    with model.active(student):
        for entry in board.entries:
            probs = F.softmax(model(entry.images), dim=-1, dtype=entry.probs.dtype)
            scores.append(meta((probs - entry.probs).reshape(1, -1)).reshape(()))
    best = int(torch.stack(scores).detach().argmax())
    return torch.sigmoid(scores[best]), board.entries[best]


def lookahead_meta_grads(
    model: nn.Module,
    meta: nn.Linear,
    board: Board,
    student: Any,
    kd_images: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    pick: str,
    lr: float,
) -> list[torch.Tensor]:
    """d L_val(w') / d meta with w' = w - lr * d(m * KD(w))/dw: the meta network's gradient, which reaches it
    only through the simulated student step (zero when lr = 0). The model's own .grad are left alone."""
    m, entry = match_teacher(model, meta, board, student, pick=pick)
    with torch.no_grad(), model.active(entry.arch):
        soft = F.softmax(model(kd_images), dim=-1, dtype=kd_images.dtype)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    with model.active(student):
        kd = m * soft_cross_entropy(model(kd_images), soft)
        grads = torch.autograd.grad(kd, params, create_graph=True, allow_unused=True)
        ahead = {n: p if g is None else p - lr * g for n, p, g in zip(names, params, grads, strict=True)}
        val_loss = F.cross_entropy(functional_call(model, ahead, (val_images,)).to(val_images.dtype), val_labels)
    return list(torch.autograd.grad(val_loss, list(meta.parameters()), allow_unused=True))


@register_task("cream")
class CreamTask(SupernetTask):
    resume_keys = SupernetTask.resume_keys + ("cream",)

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cream = CreamConfig.from_dict(cfg.cream)
        if cfg.sampling != "uniform":
            raise ValueError(
                f"task cream trains one sampled path per step: sampling must be uniform, not {cfg.sampling!r}"
            )
        self.board = Board(self.cream.board_size, self.cream.acc_gap)
        self.meta: nn.Linear | None = None
        self.meta_opt: torch.optim.Optimizer | None = None
        self.meta_updates = 0

    def build_model(self, ctx: TaskContext, num_classes: int) -> nn.Module:
        model = super().build_model(ctx, num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 101)
            self.meta = nn.Linear(self.cream.slice * num_classes, 1).to(ctx.device)
        return model

    def extra_optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        self.meta_opt = torch.optim.SGD(self.meta.parameters(), lr=self.cream.meta_lr, momentum=0.9, nesterov=True)
        return {"meta": self.meta_opt}

    def loss(self, batch: Batch) -> StepResult:
        cfg, ctx, model, board = self.cream, self.ctx, self.model, self.board
        (arch,) = sample_step_archs(self.space, self.cfg, batch.step, model.num_macs)
        distil = batch.epoch >= cfg.start_epoch and len(board) > 0
        metrics: dict[str, float] = {"board": float(len(board))}
        if distil and batch.step % cfg.meta_every == 0 and cfg.pick == "meta":
            self._update_meta(batch, arch)
            metrics["meta_updates"] = float(self.meta_updates)
        teacher_probs, m = None, None
        if distil:
            with torch.no_grad():  # the step's loss sees m as a constant: the meta network learns by look-ahead only
                m, entry = match_teacher(model, self.meta, board, arch, pick=cfg.pick)
            with torch.no_grad(), model.active(entry.arch), ctx.autocast():
                teacher_probs = F.softmax(model(batch.images).float(), dim=-1)
            metrics["m"] = float(m)
        model.set_active(arch)
        with ctx.autocast():
            logits = model(batch.images)
            ce = soft_cross_entropy(logits, batch.targets)
            loss = ce if teacher_probs is None else (m * soft_cross_entropy(logits, teacher_probs) + (2 - m) * ce) / 2
        ctx.backward(loss)
        if batch.epoch >= cfg.start_epoch:
            self._offer(arch, logits.detach(), batch)
        return StepResult(loss.detach(), archs=[arch], metrics=metrics)

    def _offer(self, arch: Any, logits: torch.Tensor, batch: Batch) -> None:
        """Offer the trained path to the board, ranked by its top-1 on this batch (averaged over ranks)."""
        top1 = (logits.argmax(-1) == batch.labels).float().mean().reshape(1) * 100
        self.ctx.all_reduce_mean([top1])
        top1 = round(float(top1), 4)
        macs = int(self.model.num_macs(arch))
        if not self.board.admits(top1, macs):
            return
        k = self.cream.slice
        probs = F.softmax(logits[:k].float(), dim=-1)
        self.board.offer(BoardEntry(arch, top1, macs, batch.images[:k].detach().float().clone(), probs.clone()))

    def _update_meta(self, batch: Batch, arch: Any) -> None:
        k = self.cream.slice
        if batch.images.shape[0] < 2 * k:
            return
        grads = lookahead_meta_grads(
            self.model,
            self.meta,
            self.board,
            arch,
            batch.images[:k].float(),
            batch.images[k : 2 * k].float(),
            batch.labels[k : 2 * k],
            pick=self.cream.pick,
            lr=self.cream.lookahead_lr,
        )
        params = list(self.meta.parameters())
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        self.ctx.all_reduce_mean(grads)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        nn.utils.clip_grad_norm_(params, 1.0)
        self.meta_opt.step()
        self.meta_opt.zero_grad(set_to_none=True)
        self.meta_updates += 1

    def evaluate(self) -> dict[str, float]:
        out = super().evaluate()
        if len(self.board):
            out["val_top1_board_best"] = self.ctx.evaluate(self.model, arch=self.board.entries[0].arch)["top1"]
        return out

    # -- checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        return {"cream": {"board": self.board.describe(), "meta_updates": self.meta_updates}}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"meta.{k}": v.detach().clone() for k, v in self.meta.state_dict().items()}
        for i, e in enumerate(self.board.entries):
            out[f"board.{i}.images"], out[f"board.{i}.probs"] = e.images, e.probs
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.meta.state_dict().items():
                v.copy_(tensors[f"meta.{k}"])
        saved = meta.get("cream", {})
        self.meta_updates = int(saved.get("meta_updates", 0))
        self.board.entries = [
            BoardEntry(
                self.space.arch_from_dict(e["arch"], source="checkpoint board"),
                float(e["top1"]),
                int(e["macs"]),
                tensors[f"board.{i}.images"],
                tensors[f"board.{i}.probs"],
            )
            for i, e in enumerate(saved.get("board", []))
        ]
