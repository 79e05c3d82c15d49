"""The DARTS supernet: every edge of every cell holds all ops (a mixed op).

Two roles share this class. The *search* network (`role="search"`, the space's `search_layers` at
`search_channels`, BatchNorm without affine as in DARTS) owns the architecture weights α and, with no active
genotype, runs every edge as the softmax(α)-weighted sum of its ops. The *evaluation* network
(`role="eval"`, the space's `layers` at `channels`) is CDARTS's weight pool: it runs the active genotype's
ops only, and the ops a genotype leaves out keep their weights for a later genotype. Both follow the
supernet protocol (`set_active`, `active()`, `extract`, `num_params`, `num_macs`, `space`), so search,
export and retraining handle them as any other supernet.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.costs.macs import model_macs
from vitnas.models.darts import (
    OPS,
    DartsNet,
    FactorizedReduce,
    StdConv,
    conv_head,
    darts_stem,
    num_params_without_aux,
    run_stem,
)
from vitnas.models.darts import stage_plan as plan_of
from vitnas.space.darts import PRIMITIVES, DartsSpace, Genotype, derive_genotype
from vitnas.supernet.base import ActiveArch

__all__ = ["CDARTSSupernet", "DartsSupernet", "MixedOp"]


class MixedOp(nn.Module):
    """All ops of one edge (`ops` in the space's order, then 'none')."""

    def __init__(self, c: int, stride: int, ops: tuple[str, ...], affine: bool) -> None:
        super().__init__()
        self.names = (*ops, "none")
        self._ops = nn.ModuleList(OPS[name](c, stride, affine) for name in self.names)

    def forward(self, x: Tensor, weights: Tensor | None = None, index: int | None = None) -> Tensor:
        if index is not None:
            return self._ops[index](x)
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class SearchCell(nn.Module):
    """A cell whose node i mixes all i + 2 predecessors."""

    def __init__(self, space: DartsSpace, c_pp: int, c_p: int, c: int, red_p: bool, red: bool, affine: bool) -> None:
        super().__init__()
        self.reduction = red
        self.preproc0 = FactorizedReduce(c_pp, c, affine) if red_p else StdConv(c_pp, c, 1, 1, 0, affine)
        self.preproc1 = StdConv(c_p, c, 1, 1, 0, affine)
        self.dag = nn.ModuleList(
            nn.ModuleList(MixedOp(c, 2 if red and j < 2 else 1, space.ops, affine) for j in range(i + 2))
            for i in range(space.n_nodes)
        )

    def forward(self, s0: Tensor, s1: Tensor, weights: list[Tensor] | None, genotype: Genotype | None) -> Tensor:
        states = [self.preproc0(s0), self.preproc1(s1)]
        if genotype is not None:
            cell, concat = (
                (genotype.reduce, genotype.reduce_concat)
                if self.reduction
                else (genotype.normal, genotype.normal_concat)
            )
            names = self.dag[0][0].names
            for row, node in zip(self.dag, cell):
                states.append(sum(row[j](states[j], index=names.index(op)) for op, j in node))
            return torch.cat([states[i] for i in concat], dim=1)
        for row, w in zip(self.dag, weights):
            # each input edge scaled by softmax(beta) with CDARTS's fixed beta: 1 / (i + 2)
            states.append(sum(op(s, w[j]) for j, (op, s) in enumerate(zip(row, states))) / len(row))
        return torch.cat(states[2:], dim=1)


class DartsSupernet(ActiveArch, nn.Module):
    """Stem, cells of mixed ops, classifier. `forward_stages(x)` also returns each stage's output (CDARTS's
    distillation heads read them)."""

    arch_type: ClassVar[type] = Genotype

    def __init__(
        self,
        space: DartsSpace,
        *,
        img_size: int | None = None,
        num_classes: int = 10,
        drop_path_rate: float = 0.0,
        role: str = "eval",
        channels: int | None = None,
    ) -> None:
        super().__init__()
        if role not in ("eval", "search"):
            raise ValueError(f"role must be 'eval' or 'search', got {role!r}")
        self.space, self.role, self.num_classes = space, role, num_classes
        self.init_kwargs = {
            "img_size": img_size, "num_classes": num_classes, "drop_path_rate": drop_path_rate, "role": role,
            "channels": channels,
        }  # fmt: skip
        self.img_size = img_size or space.img_size
        self.drop_path_rate = drop_path_rate
        # the space's widths unless `channels` overrides (CDARTS's evaluation network searches at the search width)
        default_channels, self.layers = (
            (space.channels, space.layers) if role == "eval" else (space.search_channels, space.search_layers)
        )
        self.channels = channels or default_channels
        affine = role == "eval"
        self.feature_extractor = darts_stem(space.layout, self.channels * space.stem_multiplier)
        plan = plan_of(self.layers, self.channels, space.stem_multiplier, space.n_nodes, space.layout)
        self.nas_layers = nn.ModuleList(nn.ModuleList() for _ in self.layers)
        for s, c_pp, c_p, c, red_p, red in plan:
            self.nas_layers[s].append(SearchCell(space, c_pp, c_p, c, red_p, red, affine))
        self.stage_channels = [
            next(c * space.n_nodes for s, *_, c, _, _ in reversed(plan) if s == i) for i in range(len(self.layers))
        ]
        self.fc = nn.Linear(self.stage_channels[-1], num_classes)
        n_ops = len(space.ops) + 1
        edges = sum(i + 2 for i in range(space.n_nodes))
        if role == "search":  # the reference's init: 1e-3 * randn
            self.alpha_normal = nn.Parameter(1e-3 * torch.randn(edges, n_ops))
            self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(edges, n_ops))
        self._arch = None

    # -- architecture weights ----------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_normal, self.alpha_reduce] if self.role == "search" else []

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def _node_weights(self, alpha: Tensor) -> list[Tensor]:
        probs, out, start = F.softmax(alpha, dim=-1), [], 0
        for i in range(self.space.n_nodes):
            out.append(probs[start : start + i + 2])
            start += i + 2
        return out

    def alpha_probs(self) -> dict[str, list[list[list[float]]]]:
        """softmax(α) per cell type, node and input edge (plots, derivation)."""
        return {
            name: [w.tolist() for w in self._node_weights(getattr(self, f"alpha_{name}").detach().float())]
            for name in ("normal", "reduce")
        }

    def genotype(self) -> Genotype:
        """The discrete cells α prefers (the reference's `parse`, top-2 edges per node, 'none' excluded)."""
        probs = self.alpha_probs()
        # columns in PRIMITIVES order (the space may hold fewer ops): absent ops weigh 0
        have = (*self.space.ops, "none")
        cols = [have.index(p) if p in have else None for p in PRIMITIVES]

        def reorder(cell: list) -> list:
            return [[[row[c] if c is not None else 0.0 for c in cols] for row in node] for node in cell]

        return derive_genotype(reorder(probs["normal"]), reorder(probs["reduce"]))

    # -- forward -----------------------------------------------------------------------------------
    def forward_stages(self, x: Tensor, *, detach_alpha: bool = False) -> list[Tensor]:
        genotype = self._arch
        weights = {}
        if genotype is None:
            if self.role != "search":
                raise RuntimeError("the evaluation network runs a genotype: call set_active(genotype) first")
            for name in ("normal", "reduce"):
                alpha = getattr(self, f"alpha_{name}")
                weights[name] = self._node_weights(alpha.detach() if detach_alpha else alpha)
        s0, s1 = run_stem(self.feature_extractor, x)
        outs = []
        for stage in self.nas_layers:
            for cell in stage:
                w = weights.get("reduce" if cell.reduction else "normal")
                s0, s1 = s1, cell(s0, s1, w, genotype)
            outs.append(s1)
        return outs

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)))

    def forward(self, x: Tensor, *, detach_alpha: bool = False) -> Tensor:
        return self.forward_head(self.forward_stages(x, detach_alpha=detach_alpha)[-1])

    # -- protocol: extraction and costs --------------------------------------------------------------
    def _child(self, arch: Genotype, device: str | torch.device | None = None, img_size: int | None = None) -> DartsNet:
        with torch.device(device or "cpu"):
            return DartsNet(
                arch,
                channels=self.channels,
                layers=self.layers,
                layout=self.space.layout,
                num_classes=self.num_classes,
                auxiliary=self.space.auxiliary and self.role == "eval",
                stem_multiplier=self.space.stem_multiplier,
                n_nodes=self.space.n_nodes,
                img_size=img_size or self.img_size,
                drop_path_rate=self.drop_path_rate,
            )

    def extract(self, arch: Genotype | None = None, side: str | None = None) -> DartsNet:
        """A standalone `DartsNet` of the genotype with this network's weights for its ops (BatchNorm
        without affine becomes weight 1, bias 0). An auxiliary head, which no supernet trains, starts fresh."""
        arch = self.check_arch(arch if arch is not None else self._arch)
        model = self._child(arch).to(next(self.parameters()).device)
        own = self.state_dict()
        names = (*self.space.ops, "none")
        state = {}
        for key, value in model.state_dict().items():
            if key.startswith("aux_head."):
                continue
            src = _source_key(key, arch, model, names)
            if src in own:
                state[key] = own[src].detach().clone()
            elif key.endswith((".weight", ".bias")) and value.ndim == 1:  # non-affine BatchNorm
                state[key] = torch.ones_like(value) if key.endswith(".weight") else torch.zeros_like(value)
            else:
                raise KeyError(f"no supernet weight for {key} (looked for {src})")
        model.load_state_dict(state, strict=False)
        return model.train(self.training)

    def num_params(self, arch: Genotype | None = None) -> int:
        """Parameters of the genotype's network without its auxiliary head (what papers report)."""
        arch = self.check_arch(arch if arch is not None else self._arch)
        return num_params_without_aux(self._child(arch, "meta"))

    def num_macs(self, arch: Genotype | None = None, img_size: int | None = None) -> int:
        arch = self.check_arch(arch if arch is not None else self._arch)
        return model_macs(self._child(arch, "meta", img_size=img_size))


_DAG = re.compile(r"^(nas_layers\.\d+\.\d+)\.dag\.(\d+)\.(\d+)\.(?:0\.)?(.*)$")


def _source_key(key: str, arch: Genotype, model: DartsNet, names: tuple[str, ...]) -> str:
    """The supernet key holding a `DartsNet` tensor: edge e of node n reads input j through op k, which
    the supernet keeps at `dag.n.j._ops.k`."""
    m = _DAG.match(key)
    if m is None:
        return key
    prefix, node, edge, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    stage, cell = (int(v) for v in prefix.split(".")[1:])
    reduction = model.nas_layers[stage][cell].reduction
    op, j = (arch.reduce if reduction else arch.normal)[node][edge]
    return f"{prefix}.dag.{node}.{j}._ops.{names.index(op)}.{rest}"


class CDARTSSupernet(nn.Module):
    """CDARTS's pair: the search network (α) and the evaluation network (the weight pool running the
    derived genotype), with two distillation heads after the third- and second-to-last stages that both
    networks share. The supernet protocol is the evaluation network's: extracting a genotype gives the
    network CDARTS retrains, with the weights the cycle trained for its ops."""

    def __init__(self, space: DartsSpace, *, img_size: int | None = None, num_classes: int = 10,
                 drop_path_rate: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        if len(space.layers) < 3:
            raise ValueError(
                f"CDARTS needs at least 3 stages (its heads read the two before the last), got {space.layers}"
            )
        self.init_kwargs = {"img_size": img_size, "num_classes": num_classes, "drop_path_rate": drop_path_rate}
        self.search = DartsSupernet(space, img_size=img_size, num_classes=num_classes, role="search")
        # as in the reference, the evaluation network trains during search at the search network's width
        self.evalnet = DartsSupernet(
            space,
            img_size=img_size,
            num_classes=num_classes,
            drop_path_rate=drop_path_rate,
            channels=space.search_channels,
        )
        size = self.search.img_size // (4 if space.layout == "cifar" else 32)
        n = len(space.layers)
        c1, c2 = self.search.stage_channels[n - 3], self.search.stage_channels[n - 2]
        # the reference's DistillHeadCIFAR: pool 6 stride 2, BatchNorm without affine
        self.distill_head1 = conv_head(c1, num_classes, max(size * 2, 1), pool=6, stride=2, affine=False)
        self.distill_head2 = conv_head(c2, num_classes, max(size, 1), pool=6, stride=2, affine=False)
        self.register_buffer("ensemble_weights", torch.full((3,), 1 / 3))  # softmax of the fixed 0.333s

    # the protocol, answered by the evaluation network
    @property
    def space(self) -> DartsSpace:
        return self.evalnet.space

    @property
    def num_classes(self) -> int:
        return self.evalnet.num_classes

    def set_active(self, arch: Genotype, side: str = "left") -> None:
        self.evalnet.set_active(arch, side)

    def active(self, arch: Genotype, side: str = "left"):  # noqa: ANN201 (a context manager)
        return self.evalnet.active(arch, side)

    @property
    def arch(self) -> Genotype | None:
        return self.evalnet.arch

    def check_arch(self, arch: Genotype) -> Genotype:
        return self.evalnet.check_arch(arch)

    def extract(self, arch: Genotype | None = None, side: str | None = None) -> DartsNet:
        return self.evalnet.extract(arch, side)

    def num_params(self, arch: Genotype | None = None) -> int:
        return self.evalnet.num_params(arch)

    def num_macs(self, arch: Genotype | None = None, img_size: int | None = None) -> int:
        return self.evalnet.num_macs(arch, img_size)

    def forward(self, x: Tensor) -> Tensor:
        """The evaluation network on its active genotype (what validation and search score)."""
        return self.evalnet(x)

    def ensemble(self, net: DartsSupernet, x: Tensor, *, detach_alpha: bool = False) -> tuple[Tensor, Tensor]:
        """(logits, ensemble): the two heads' and the classifier's logits, each times its ensemble weight,
        concatenated along the batch as the reference does."""
        stages = net.forward_stages(x, detach_alpha=detach_alpha)
        n = len(stages)
        logits = net.forward_head(stages[-1])
        outs = (self.distill_head1(stages[n - 3]), self.distill_head2(stages[n - 2]), logits)
        return logits, torch.cat([w * o for w, o in zip(self.ensemble_weights, outs)], dim=0)
