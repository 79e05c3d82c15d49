"""MiniViT weight distillation (Zhang et al., CVPR'22; microsoft/Cream MiniViT/Mini-Swin/main.py): the
student learns the teacher's token-to-token relations, which are N x N whatever the two widths, so a
narrow weight-multiplexed student can distil a wider teacher of another depth and head count.

attention relation (per mapped layer pair, for all 9 (i, j) in {q, k, v}^2): q, k, v are the raw qkv
    Linear output (bias included, before the attention scale), each (B, N, C) split into `heads`
    channel groups ("relation heads", C / heads channels each); R_ij = softmax(X_i X_j^T / sqrt(C / heads))
    per group, (B, heads, N, N). The loss is the cross-entropy of the teacher's R_ij (probabilities)
    against the student's log R_ij, mean over batch, groups and rows, averaged over the 9 pairs -- the
    reference's optimisation target. Being a cross-entropy it equals the teacher's mean row entropy (not
    0) when the student matches; `attention_relation_kl` gives CE - entropy, 0 for a match.
hidden relation: the block outputs L2-normalised over channels, G = x x^T (B, N, N); the loss is
    mean((G_s - G_t)^2) * N. The reference multiplies by 49, its window's token count (a Swin window is
    7 x 7): the scale is the number of tokens a relation row holds, here N, the tokens compared.

Tokens pair one to one, so student and teacher need one patch grid. Leading class / distillation
tokens (a DeiT teacher has one, Mini-DeiT none) are dropped from the side that has them when the two
layouts differ, so both cover the patch tokens; with equal layouts every token is used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.models.minivit import MiniDeiT
from vitnas.models.vit import VisionTransformer

__all__ = [
    "Features",
    "LayerPair",
    "Layout",
    "align_tokens",
    "attention_relation_kl",
    "attention_relation_loss",
    "auto_layer_map",
    "capture_features",
    "check_pairing",
    "hidden_relation_loss",
    "layout_of",
    "parse_layer_pairs",
    "relation_losses",
    "resolve_layer_map",
    "split_qkv",
]

log = logging.getLogger(__name__)

LayerPair = tuple[int, int]  # (student layer, teacher layer), 0-based


# -- the losses ------------------------------------------------------------------------------------
def split_qkv(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The raw qkv Linear output (B, N, 3C), rows laid out [q; k; v] -> q, k, v, each (B, N, C), float32."""
    if qkv.ndim != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"qkv of shape {tuple(qkv.shape)}: expected (batch, tokens, 3 x width)")
    q, k, v = qkv.float().chunk(3, dim=-1)
    return q, k, v


def _check_tokens(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"{what}: the student's features have (batch, tokens) {tuple(student.shape[:2])}, the teacher's "
            f"{tuple(teacher.shape[:2])}; relations pair tokens one to one (see align_tokens)"
        )


def _relation_logits(x: Tensor, y: Tensor, heads: int) -> Tensor:
    """(B, N, C), (B, N, C) -> (B, heads, N, N): x_h y_h^T / sqrt(C / heads) for each channel group h."""
    B, N, C = x.shape
    if C % heads:
        raise ValueError(f"q/k/v width {C} is not divisible by distill_relation_heads={heads}")
    d = C // heads
    xh = x.reshape(B, N, heads, d).transpose(1, 2)
    yh = y.reshape(B, N, heads, d).transpose(1, 2)
    return xh @ yh.transpose(-2, -1) / math.sqrt(d)


def _attention_terms(student_qkv: Tensor, teacher_qkv: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """(cross-entropy, KL) of the teacher's relations against the student's, each averaged over the 9
    (i, j) pairs and over batch, relation heads and rows."""
    _check_tokens(student_qkv, teacher_qkv, "attention relation")
    s, t = split_qkv(student_qkv), split_qkv(teacher_qkv)
    ce = kl = student_qkv.new_zeros((), dtype=torch.float32)
    for i in range(3):
        for j in range(3):
            log_ps = F.log_softmax(_relation_logits(s[i], s[j], heads), dim=-1)
            log_pt = F.log_softmax(_relation_logits(t[i], t[j], heads), dim=-1)
            pt = log_pt.exp()
            ce = ce - (pt * log_ps).sum(-1).mean()
            kl = kl + (pt * (log_pt - log_ps)).sum(-1).mean()
    return ce / 9, kl / 9


def attention_relation_loss(student_qkv: Tensor, teacher_qkv: Tensor, heads: int = 1) -> Tensor:
    """One layer pair's attention-relation loss (the reference's cross-entropy), from the raw qkv
    outputs (B, N, 3C_s) and (B, N, 3C_t) of one token layout."""
    return _attention_terms(student_qkv, teacher_qkv, heads)[0]


def attention_relation_kl(student_qkv: Tensor, teacher_qkv: Tensor, heads: int = 1) -> Tensor:
    """KL(teacher || student) of the same relations: the cross-entropy less the teacher's entropy, so 0
    when the student's relations equal the teacher's (the same gradient as the cross-entropy)."""
    return _attention_terms(student_qkv, teacher_qkv, heads)[1]


def hidden_relation_loss(student: Tensor, teacher: Tensor, scale: float | None = None) -> Tensor:
    """mean((G_s - G_t)^2) * scale with G = x x^T of the channel-normalised hidden states (B, N, C);
    `scale` defaults to N, the tokens of a relation row (the reference's 49 for a 7 x 7 window)."""
    _check_tokens(student, teacher, "hidden relation")
    xs = F.normalize(student.float(), dim=-1)
    xt = F.normalize(teacher.float(), dim=-1)
    gs, gt = xs @ xs.transpose(-1, -2), xt @ xt.transpose(-1, -2)
    return torch.mean((gs - gt) ** 2) * (student.shape[1] if scale is None else scale)


def align_tokens(
    student: Tensor, teacher: Tensor, *, student_prefix: int, teacher_prefix: int
) -> tuple[Tensor, Tensor]:
    """Both sides' (B, N, C) tokens over one layout: unchanged when the layouts agree, else without their
    leading class / distillation tokens. Raise when the patch token counts differ."""
    ns, nt = student.shape[1], teacher.shape[1]
    ps, pt = ns - student_prefix, nt - teacher_prefix
    if ps != pt:
        raise ValueError(
            f"the student has {ps} patch tokens ({ns} tokens), the teacher {pt} ({nt} tokens): relation "
            f"distillation pairs tokens one to one, so both need one patch grid (patch size and img_size)"
        )
    if student_prefix == teacher_prefix:
        return student, teacher
    return student[:, student_prefix:], teacher[:, teacher_prefix:]


# -- models: layout and feature capture -------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """What relation distillation needs to know of a model: its layers (a Mini-DeiT group runs
    `repeats` layers), leading non-patch tokens, patch tokens and the q/k/v width of each layer."""

    kind: str  # "mini_deit" | "vit"
    layers: int
    prefix: int
    patches: int
    widths: tuple[int, ...]


def layout_of(model: nn.Module) -> Layout:
    """The Layout of a Mini-DeiT or a vitnas VisionTransformer (DeiT); raise for other models."""
    if isinstance(model, MiniDeiT):
        widths = tuple(g.block.attn.qkv.out_features // 3 for g in model.blocks for _ in range(g.repeats))
        return Layout("mini_deit", len(widths), 0, model.grid[0] * model.grid[1], widths)
    if isinstance(model, VisionTransformer):
        widths = tuple(b.attn.qkv.out_features // 3 for b in model.blocks)
        prefix = 1 + int(getattr(model, "dist_token", None) is not None)
        return Layout("vit", len(widths), prefix, model.grid[0] * model.grid[1], widths)
    raise ValueError(
        f"MiniViT distillation reads the layers of Mini-DeiT and VisionTransformer (DeiT) models; got a "
        f"{type(model).__name__}"
    )


@dataclass
class Features:
    """What one forward inside `capture_features` recorded, by layer index: the raw qkv output
    (B, N, 3C) and the layer's output hidden state (B, N, C)."""

    layout: Layout
    qkv: dict[int, Tensor] = field(default_factory=dict)
    hidden: dict[int, Tensor] = field(default_factory=dict)

    def take(self, kind: str, layer: int) -> Tensor:
        store = self.qkv if kind == "qkv" else self.hidden
        if layer not in store:
            raise RuntimeError(
                f"layer {layer}'s {kind} was not captured: run the model once inside capture_features(model, "
                f"layers) with the layer among `layers`"
            )
        return store[layer]


class _Recorder:
    """Counts hook calls in call order (a multiplexed block fires once per repetition) and keeps the
    wanted layers."""

    def __init__(self, features: Features, wanted: set[int]) -> None:
        self.features, self.wanted = features, wanted
        self.calls = {"qkv": 0, "hidden": 0}

    def add(self, kind: str, compute: Callable[[], Tensor]) -> None:
        i = self.calls[kind]
        self.calls[kind] += 1
        if i >= self.features.layout.layers:
            raise RuntimeError(
                f"the model ran more than {self.features.layout.layers} layers inside one capture_features: "
                f"capture one forward at a time"
            )
        if i in self.wanted:
            (self.features.qkv if kind == "qkv" else self.features.hidden)[i] = compute()


def _install_hooks(model: nn.Module, rec: _Recorder) -> list[torch.utils.hooks.RemovableHandle]:
    def on_qkv(module: nn.Module, args: tuple, out: Tensor) -> None:
        rec.add("qkv", lambda: out)

    def on_attn_input(module: nn.Module, args: tuple) -> None:
        rec.add("qkv", lambda: F.linear(args[0], module.qkv.weight, module.qkv.bias))

    def on_layer(module: nn.Module, args: tuple, out: Tensor) -> None:
        rec.add("hidden", lambda: out)

    handles = []
    if isinstance(model, MiniDeiT):  # one MiniBlock per group, called `repeats` times per forward
        for group in model.blocks:
            handles.append(group.block.attn.qkv.register_forward_hook(on_qkv))
            handles.append(group.block.register_forward_hook(on_layer))
    else:  # vitnas Attention applies its qkv weights functionally (a Linear hook never fires): recompute
        for block in model.blocks:
            handles.append(block.attn.register_forward_pre_hook(on_attn_input))
            handles.append(block.register_forward_hook(on_layer))
    return handles


@contextmanager
def capture_features(model: nn.Module, layers: Iterable[int] | None = None) -> Iterator[Features]:
    """Record the qkv outputs and hidden states of `layers` (default: all) in the one forward run inside
    the block; the hooks are removed on exit. Tensors keep autograd exactly when the forward tracks it
    (run a teacher under torch.no_grad(), not inference_mode, to use its features in a loss)."""
    features = Features(layout_of(model))
    wanted = set(range(features.layout.layers)) if layers is None else set(layers)
    handles = _install_hooks(model, _Recorder(features, wanted))
    try:
        yield features
    finally:
        for h in handles:
            h.remove()


def relation_losses(
    student: Features, teacher: Features, pairs: Sequence[LayerPair], heads: int = 1
) -> tuple[Tensor, Tensor]:
    """(attention-relation loss, hidden-relation loss), each averaged over the layer pairs."""
    if not pairs:
        raise ValueError("relation distillation needs at least one (student, teacher) layer pair")
    sp, tp = student.layout.prefix, teacher.layout.prefix
    attn = hidden = None
    for s, t in pairs:
        sq, tq = align_tokens(student.take("qkv", s), teacher.take("qkv", t), student_prefix=sp, teacher_prefix=tp)
        sh, th = align_tokens(
            student.take("hidden", s), teacher.take("hidden", t), student_prefix=sp, teacher_prefix=tp
        )
        a, h = attention_relation_loss(sq, tq, heads), hidden_relation_loss(sh, th)
        attn, hidden = (a, h) if attn is None else (attn + a, hidden + h)
    return attn / len(pairs), hidden / len(pairs)


# -- layer maps ------------------------------------------------------------------------------------
def auto_layer_map(student_layers: int, teacher_layers: int) -> list[LayerPair]:
    """Every student layer with an evenly spaced teacher layer, round((i + 1) L_t / L_s) - 1 (halves
    up): the last layers always pair, and equal depths pair layer by layer."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"cannot map {student_layers} student layers onto {teacher_layers} teacher layers")
    return [(i, max(math.floor((i + 1) * teacher_layers / student_layers + 0.5) - 1, 0)) for i in range(student_layers)]


def parse_layer_pairs(spec: str) -> list[LayerPair] | None:
    """`distill_layers` -> its pairs ("s:t,s:t", 0-based), or None for "auto"; checks the syntax only."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"distill_layers={spec!r}; expected 'auto' or 'student:teacher' pairs such as '1:3,3:7'")
    if spec.strip() == "auto":
        return None
    pairs: list[LayerPair] = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        try:
            if len(fields) != 2:
                raise ValueError
            pair = (int(fields[0]), int(fields[1]))
        except ValueError:
            raise ValueError(
                f"distill_layers={spec!r}: {part.strip()!r} is not a 'student:teacher' pair of layer indices "
                f"(expected 'auto' or e.g. '1:3,3:7')"
            ) from None
        if pair in pairs:
            raise ValueError(f"distill_layers={spec!r}: the pair {pair[0]}:{pair[1]} is given twice")
        pairs.append(pair)
    return pairs


def resolve_layer_map(spec: str, student_layers: int, teacher_layers: int) -> list[LayerPair]:
    """`distill_layers` for a student and a teacher of these depths: the auto map, or the given pairs
    checked against both ranges."""
    pairs = parse_layer_pairs(spec)
    if pairs is None:
        return auto_layer_map(student_layers, teacher_layers)
    for s, t in pairs:
        for who, i, n in (("student", s, student_layers), ("teacher", t, teacher_layers)):
            if not 0 <= i < n:
                raise ValueError(
                    f"distill_layers={spec!r}: {who} layer {i} is out of range 0..{n - 1} (the {who} has {n} layers)"
                )
    return pairs


def check_pairing(student: Layout, teacher: Layout, pairs: Sequence[LayerPair], heads: int) -> None:
    """Raise before training unless the two models' tokens pair up and every mapped q/k/v width splits
    into `heads` relation heads."""
    if student.patches != teacher.patches:
        raise ValueError(
            f"the student has {student.patches} patch tokens, the teacher {teacher.patches}: relation "
            f"distillation pairs tokens one to one, so both need one patch grid (patch size and img_size)"
        )
    for s, t in pairs:
        for who, width in (("student", student.widths[s]), ("teacher", teacher.widths[t])):
            if width % heads:
                raise ValueError(
                    f"distill_relation_heads={heads} does not divide the {who}'s q/k/v width {width} "
                    f"(layer {s if who == 'student' else t})"
                )
    log.info("minivit distillation pairs (student:teacher) %s", ",".join(f"{s}:{t}" for s, t in pairs))
