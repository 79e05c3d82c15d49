"""TinyCLIP's weight inheritance (microsoft/Cream `TinyCLIP/src/open_clip/weight_inherit.py`, `l0module.py`):
how a small CLIP starts from a large one.

Manual: `inherit_manual(teacher, student_config)` takes teacher layers at a fixed step and the leading
slice of every tensor (the first heads of each q/k/v projection).

Automatic (CoFi-style): `L0Masks` learns hard-concrete masks over every layer's heads and MLP units and each
tower's hidden channels, pushed towards a target sparsity by a Lagrangian; `prune(model, masks)` then
removes what the masks switch off, giving a smaller plain CLIP whose outputs equal the masked model's.

    masks = L0Masks(teacher.config, target_sparsity=0.25, warmup_steps=1000)
    opt_masks = torch.optim.AdamW(masks.param_groups())     # λ get a negative LR: gradient *ascent*
    loss = task_loss(model(images, tokens, masks())) + masks.lagrangian(step)[0]
    ...; masks.constrain_()                                  # after each optimizer step, as the reference
    student = prune(model, masks.eval())                     # deterministic masks folded into the weights
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.models.clip import CLIP, CLIPConfig, CLIPMasks, CLIPTowerConfig, TowerMask

__all__ = ["L0Masks", "inherit_manual", "prune", "teacher_layer_map"]

log = logging.getLogger(__name__)

TOWERS = ("visual", "text")
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


# -- manual inheritance ----------------------------------------------------------------------------
def teacher_layer_map(teacher_depth: int, student_depth: int) -> list[int]:
    """Student layer i <- teacher layer i * (T // S) (the reference's "interval_front"). When T < 2S the
    step is 1, so the student takes the teacher's *first* S layers (12 -> 9 gives 0..8), as the reference."""
    step = teacher_depth // max(student_depth, 1)
    return [i * step for i in range(student_depth)]


def _front(t: Tensor, shape: torch.Size) -> Tensor:
    """The leading slice of `t` along every dim (scalars, e.g. the logit scale, are kept)."""
    if t.numel() == 1:
        return t.reshape(shape)
    if t.ndim != len(shape) or any(s > n for s, n in zip(shape, t.shape)):
        raise ValueError(f"cannot slice a teacher tensor of shape {tuple(t.shape)} to {tuple(shape)}")
    return t[tuple(slice(0, s) for s in shape)]


def _front_heads(t: Tensor, shape: torch.Size, head_dim: int) -> Tensor:
    """`in_proj_weight` / `in_proj_bias` viewed as (3, heads, head_dim[, in]): the first heads of each of
    q, k and v (and the leading input channels)."""
    heads = shape[0] // (3 * head_dim)
    if t.ndim == 2:
        return t.view(3, -1, head_dim, t.shape[1])[:, :heads, :, : shape[1]].reshape(shape)
    return t.view(3, -1, head_dim)[:, :heads].reshape(shape)


def inherit_manual(teacher: CLIP, student_config: CLIPConfig) -> CLIP:
    """A new CLIP of `student_config` whose every tensor is taken from `teacher`: layer i of each tower from
    teacher layer `teacher_layer_map(T, S)[i]`, each tensor's leading slice, the first heads of q/k/v.
    Both towers must keep the teacher's head width (TinyCLIP: 64)."""
    t_cfg = teacher.config
    for name, t, s in (("vision", t_cfg.vision, student_config.vision), ("text", t_cfg.text, student_config.text)):
        if t.head_dim() != s.head_dim():
            raise ValueError(f"{name} head width {s.head_dim()} differs from the teacher's {t.head_dim()}")
    maps = {
        "visual.": teacher_layer_map(t_cfg.vision.layers, student_config.vision.layers),
        "": teacher_layer_map(t_cfg.text.layers, student_config.text.layers),
    }
    head_dims = {"visual.": t_cfg.vision.head_dim(), "": t_cfg.text.head_dim()}
    log.info("inheriting layers: vision %s, text %s", maps["visual."], maps[""])
    student = CLIP(student_config)
    src = teacher.state_dict()
    out = {}
    with torch.no_grad():
        for key, want in student.state_dict().items():
            m = _BLOCK.match(key)
            if m is None:
                out[key] = _front(src[key], want.shape).clone()
                continue
            prefix = m.group(1) or ""
            t_key = f"{prefix}transformer.resblocks.{maps[prefix][int(m.group(2))]}.{m.group(3)}"
            if m.group(3).startswith("attn.in_proj_"):
                out[key] = _front_heads(src[t_key], want.shape, head_dims[prefix]).clone()
            else:
                out[key] = _front(src[t_key], want.shape).clone()
    student.load_state_dict(out, strict=True)
    return student


# -- automatic inheritance: hard-concrete masks ----------------------------------------------------
# stretch interval, temperature and the deterministic-mask factor (Wang et al. 2020), all the reference's
LIMIT_L, LIMIT_R, BETA, EPS, MAGICAL = -0.1, 1.1, 2.0 / 3.0, 1e-6, 0.8
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)


def _score(log_alpha: Tensor) -> Tensor:
    """P(z > 0) under the stretched hard-concrete: 1 - CDF(0), the reference's `score_loga` (CDF clamped to
    [eps, 1 - eps])."""
    x = (0.0 - LIMIT_L) / (LIMIT_R - LIMIT_L)
    return 1.0 - torch.sigmoid(math.log(x / (1 - x)) * BETA - log_alpha).clamp(EPS, 1 - EPS)


def hard_concrete_sample(log_alpha: Tensor) -> Tensor:
    """A training-time mask in [0, 1] with exact 0s and 1s: sigmoid((logit u + log α) / β) stretched to
    (l, r) and clipped."""
    u = torch.empty_like(log_alpha).uniform_(EPS, 1 - EPS)
    z = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    return (z * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def deterministic_mask(log_alpha: Tensor) -> Tensor:
    """The inference mask: sigmoid(log α / β · 0.8), with its round(expected number of zeros) smallest
    entries set to 0."""
    log_alpha = log_alpha.detach()
    soft = torch.sigmoid(log_alpha / BETA * MAGICAL)
    zeros = round(log_alpha.numel() - _score(log_alpha).sum().item())
    if zeros > 0:
        soft[torch.topk(soft, k=zeros, largest=False).indices] = 0.0
    return soft


class _TowerLogAlpha(nn.Module):
    """log α of one tower: `hidden` (width,), `heads[i]` (heads_i,), `mlp[i]` (mlp_width_i,)."""

    def __init__(self, cfg: CLIPTowerConfig, init: float) -> None:
        super().__init__()
        self.width, self.head_dim = cfg.width, cfg.head_dim()
        self.hidden = nn.Parameter(torch.full((cfg.width,), init))
        self.heads = nn.ParameterList(nn.Parameter(torch.full((h,), init)) for h in cfg.layer_heads())
        self.mlp = nn.ParameterList(nn.Parameter(torch.full((m,), init)) for m in cfg.layer_mlp())

    def params_per_head(self) -> int:
        """The reference's (4W² + 4W) / heads with W = heads · head_dim, written so it holds for a pruned tower."""
        return 4 * self.head_dim * (self.width + 1)

    def prunable(self) -> int:
        """Parameters the masks can remove (attention and MLP; norms and embeddings are not counted)."""
        heads = sum(p.numel() for p in self.heads) * self.params_per_head()
        return heads + sum(2 * self.width * p.numel() + self.width + p.numel() for p in self.mlp)

    def expected_remaining(self) -> Tensor:
        """Expected kept parameters, hidden channels included (the reference's `hidden=True` formula)."""
        hidden = _score(self.hidden).sum()
        heads = sum(_score(p).sum() for p in self.heads)
        mlp = sum(_score(p).sum() for p in self.mlp)
        return hidden * heads * self.params_per_head() / self.width + 2 * hidden * mlp

    def masks(self, sample: bool) -> TowerMask:
        fn = hard_concrete_sample if sample else deterministic_mask
        return TowerMask(fn(self.hidden), [fn(p) for p in self.heads], [fn(p) for p in self.mlp])


class L0Masks(nn.Module):
    """Hard-concrete masks over heads, MLP units and hidden channels of both CLIP towers (TinyCLIP's
    automatic weight inheritance, `--prune-image --prune-text --total-loss-flag`).

    Calling it gives `CLIPMasks` for `CLIP.forward(..., masks=)`: sampled in training mode, deterministic
    in eval mode. `lagrangian(step)` is the sparsity penalty over both towers together. Its multipliers
    `lambda_1`, `lambda_2` must be *ascended*: put them in an optimizer group with a negative learning rate
    (`param_groups()`, the reference's -0.02; torch's optimizers accept it per group), or negate their
    gradients before a normal step. Call `constrain_()` after each step (log α clamped to [log 0.01, log 100]).
    One λ pair serves both towers: the reference averages the two towers' pairs, which start equal and get
    equal gradients, so they stay equal."""

    def __init__(
        self,
        config: CLIPConfig,
        *,
        target_sparsity: float = 0.25,
        start_sparsity: float = 0.0,
        warmup_steps: int = 1000,
        init_log_alpha: float = 10.0,
        init_lambda: float = 10.0,
        towers: Sequence[str] = TOWERS,
    ) -> None:
        super().__init__()
        unknown = set(towers) - set(TOWERS)
        if unknown or not towers:
            raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {list(towers)}")
        cfgs = {"visual": config.vision, "text": config.text}
        self.towers = nn.ModuleDict({t: _TowerLogAlpha(cfgs[t], init_log_alpha) for t in towers})
        self.lambda_1 = nn.Parameter(torch.tensor(float(init_lambda)))
        self.lambda_2 = nn.Parameter(torch.tensor(float(init_lambda)))
        self.target, self.start, self.warmup_steps = target_sparsity, start_sparsity, warmup_steps

    def forward(self) -> CLIPMasks:
        return CLIPMasks(**{name: t.masks(sample=self.training) for name, t in self.towers.items()})

    @torch.no_grad()
    def deterministic(self) -> CLIPMasks:
        """The inference masks whatever the mode (what `prune` folds in)."""
        return CLIPMasks(**{name: t.masks(sample=False) for name, t in self.towers.items()})

    def mask_parameters(self) -> list[nn.Parameter]:
        return list(self.towers.parameters())

    def lambda_parameters(self) -> list[nn.Parameter]:
        return [self.lambda_1, self.lambda_2]

    def param_groups(self, mask_lr: float = 0.02, lambda_lr: float = -0.02) -> list[dict[str, Any]]:
        """Optimizer groups as the reference's: masks descend at `mask_lr`, λ ascend (negative `lambda_lr`)."""
        return [
            {"params": self.mask_parameters(), "lr": mask_lr, "weight_decay": 0.0},
            {"params": self.lambda_parameters(), "lr": lambda_lr, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def constrain_(self) -> None:
        for p in self.mask_parameters():
            p.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def target_sparsity(self, step: int) -> float:
        """Rises linearly from `start_sparsity` to `target_sparsity` over `warmup_steps`, then stays."""
        if self.warmup_steps <= 0:
            return self.target
        return self.start + (self.target - self.start) * min(1.0, step / self.warmup_steps)

    def expected_sparsity(self) -> Tensor:
        """1 - expected kept / prunable parameters, summed over the towers (differentiable in log α)."""
        kept = sum(t.expected_remaining() for t in self.towers.values())
        return 1.0 - kept / sum(t.prunable() for t in self.towers.values())

    def lagrangian(self, step: int) -> tuple[Tensor, Tensor, float]:
        """(λ1·max(t − ŝ, 0) + λ2·max(t − ŝ, 0)², ŝ detached, t): zero once the expected sparsity ŝ reaches
        the scheduled target t; one-sided, as the reference."""
        expected = self.expected_sparsity()
        target = self.target_sparsity(step)
        gap = F.relu(target - expected)
        return self.lambda_1 * gap + self.lambda_2 * gap.square(), expected.detach(), target


# -- pruning ---------------------------------------------------------------------------------------
def _kept(z: Tensor | None, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(mask values, indices of the non-zero ones); no mask keeps everything at 1."""
    z = torch.ones(n, device=device) if z is None else z.detach().to(device).float()
    if z.shape != (n,):
        raise ValueError(f"mask of shape {tuple(z.shape)} for {n} units")
    return z, torch.nonzero(z).flatten()


def _prune_block(
    sd: dict[str, Tensor], p: str, head_dim: int, hidden: tuple[Tensor, Tensor], zt: Tensor | None, zm: Tensor | None
) -> None:
    """Prune block `p` of a state dict in place: keep the hidden channels `hidden` = (mask values, kept
    indices), and the heads and MLP units whose masks are non-zero; mask values fold into the weights
    whose outputs they scale (out_proj: heads and hidden; c_proj: units and hidden)."""
    zh, kh = hidden
    w_in = sd[p + "attn.in_proj_weight"]
    heads = w_in.shape[0] // (3 * head_dim)
    zt, kt = _kept(zt, heads, zh.device)
    w_in = w_in.view(3, heads, head_dim, w_in.shape[1])
    sd[p + "attn.in_proj_weight"] = w_in[:, kt][..., kh].reshape(-1, len(kh))
    sd[p + "attn.in_proj_bias"] = sd[p + "attn.in_proj_bias"].view(3, heads, head_dim)[:, kt].reshape(-1)
    w_out = sd[p + "attn.out_proj.weight"]
    w_out = (w_out * zh[:, None]).view(w_out.shape[0], heads, head_dim) * zt[None, :, None]
    sd[p + "attn.out_proj.weight"] = w_out[kh][:, kt].reshape(len(kh), -1)
    sd[p + "attn.out_proj.bias"] = (sd[p + "attn.out_proj.bias"] * zh)[kh]
    zm, km = _kept(zm, sd[p + "mlp.c_fc.weight"].shape[0], zh.device)
    sd[p + "mlp.c_fc.weight"] = sd[p + "mlp.c_fc.weight"][km][:, kh]
    sd[p + "mlp.c_fc.bias"] = sd[p + "mlp.c_fc.bias"][km]
    sd[p + "mlp.c_proj.weight"] = (sd[p + "mlp.c_proj.weight"] * zm[None] * zh[:, None])[kh][:, km]
    sd[p + "mlp.c_proj.bias"] = (sd[p + "mlp.c_proj.bias"] * zh)[kh]
    for ln in ("ln_1", "ln_2"):
        sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"] = sd[f"{p}{ln}.weight"][kh], sd[f"{p}{ln}.bias"][kh]


def _prune_tower(sd: dict[str, Tensor], cfg: CLIPTowerConfig, mask: TowerMask, vision: bool) -> dict[str, Any]:
    """Prune one tower of `sd` in place; returns the tower's new config fields."""
    pre = "visual." if vision else ""
    device = sd[pre + "transformer.resblocks.0.ln_1.weight"].device if cfg.layers else torch.device("cpu")
    zh, kh = _kept(mask.hidden, cfg.width, device)
    for i in range(cfg.layers):
        zt = None if mask.heads is None else mask.heads[i]
        zm = None if mask.mlp is None else mask.mlp[i]
        _prune_block(sd, f"{pre}transformer.resblocks.{i}.", cfg.head_dim(), (zh, kh), zt, zm)
    # embeddings write the residual stream (scaled by the hidden mask); final norms are only sliced
    if vision:
        sd["visual.conv1.weight"] = (sd["visual.conv1.weight"] * zh.view(-1, 1, 1, 1))[kh]
        sd["visual.class_embedding"] = (sd["visual.class_embedding"] * zh)[kh]
        norms, proj = ("visual.ln_pre", "visual.ln_post"), "visual.proj"
    else:
        sd["token_embedding.weight"] = (sd["token_embedding.weight"] * zh)[:, kh]
        norms, proj = ("ln_final",), "text_projection"
    sd[pre + "positional_embedding"] = (sd[pre + "positional_embedding"] * zh)[:, kh]
    for n in norms:
        sd[n + ".weight"], sd[n + ".bias"] = sd[n + ".weight"][kh], sd[n + ".bias"][kh]
    sd[proj] = (sd[proj] * zh[:, None])[kh]
    heads = [sd[f"{pre}transformer.resblocks.{i}.attn.in_proj_weight"].shape[0] for i in range(cfg.layers)]
    heads = [h // (3 * cfg.head_dim()) for h in heads]
    mlp = [sd[f"{pre}transformer.resblocks.{i}.mlp.c_fc.weight"].shape[0] for i in range(cfg.layers)]
    uniform = len(set(heads)) <= 1 and len(set(mlp)) <= 1 and cfg.layers > 0
    return {
        "width": len(kh),
        "head_width": cfg.head_dim(),
        "heads": heads[0] if uniform else heads,
        "mlp_width": mlp[0] if uniform else mlp,
    }


def prune(model: CLIP, masks: CLIPMasks | L0Masks) -> CLIP:
    """A smaller plain CLIP without the heads, MLP units and hidden channels whose mask is 0, the non-zero
    mask values folded into the weights: its outputs equal `model(..., masks=masks)`'s. `L0Masks` are read
    through their deterministic (inference) masks. The result's config has per-layer lists where layers
    differ; it is rebuilt from a checkpoint by the "clip" model spec."""
    if isinstance(masks, L0Masks):
        masks = masks.deterministic()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    with torch.no_grad():
        if masks.visual is not None:
            cfg["vision"].update(_prune_tower(sd, model.config.vision, masks.visual, vision=True))
        if masks.text is not None:
            cfg["text"].update(_prune_tower(sd, model.config.text, masks.text, vision=False))
    config = CLIPConfig.from_dict(cfg)
    with torch.device("meta"):
        pruned = CLIP(config)
    pruned.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True, assign=True)
    n_old, n_new = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    log.info("pruned CLIP: %.2fM -> %.2fM parameters", n_old / 1e6, n_new / 1e6)
    return pruned.train(model.training)
