"""The DARTS cell space (DARTS, P-DARTS, PC-DARTS, CDARTS): pure Python, no torch.

A cell has two inputs (the outputs of the two previous cells) and `n_nodes` intermediate nodes; node i picks
two of its i + 2 predecessors, each through one of the 7 non-zero ops; the cell's output concatenates the
intermediate nodes. A network repeats one normal cell and one reduction cell (stride 2 on the cell inputs)
over `layers` cells per stage; the last cell of every stage but the final one reduces.

`Genotype` reads and writes the reference's strings (`lib/utils/genotypes.py`), both the nested form
CDARTS writes (`normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], ...]`) and the flat one of the DARTS
papers (`normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ...]`), without `eval`.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from vitnas.space.base import ArchIO, SpaceIO, as_int, as_tuple

__all__ = ["PRIMITIVES", "DartsSpace", "Genotype", "derive_genotype", "published_genotype"]

# The reference's order (CDARTS lib/models/ops.py); 'none' last, as `parse` assumes.
PRIMITIVES = (
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "none",
)
# Ops a genotype may use (every primitive but 'none'), cheapest first (parameters of a C-channel edge).
OP_COST_ORDER = (
    "skip_connect",
    "max_pool_3x3",
    "avg_pool_3x3",
    "dil_conv_3x3",
    "sep_conv_3x3",
    "dil_conv_5x5",
    "sep_conv_5x5",
)

SHORT = {
    "max_pool_3x3": "max3",
    "avg_pool_3x3": "avg3",
    "skip_connect": "skip",
    "sep_conv_3x3": "sep3",
    "sep_conv_5x5": "sep5",
    "dil_conv_3x3": "dil3",
    "dil_conv_5x5": "dil5",
    "none": "none",
}

Edge = tuple[str, int]
Cell = tuple[tuple[Edge, ...], ...]


def _cell(value: Any, name: str) -> Cell:
    """A cell as nodes of (op, input) edges, from the nested or the flat (two edges per node) form."""
    items = as_tuple(value, name)
    if items and all(_is_edge(e) for e in items):  # flat DARTS form: consecutive pairs are one node
        if len(items) % 2:
            raise ValueError(f"{name}: a flat genotype lists two edges per node, got {len(items)} edges")
        items = tuple(items[i : i + 2] for i in range(0, len(items), 2))
    nodes = []
    for i, node in enumerate(items):
        edges = as_tuple(node, f"{name}[{i}]")
        if not edges or not all(_is_edge(e) for e in edges):
            raise ValueError(f"{name}[{i}] must be a list of (op, input) pairs, got {node!r}")
        nodes.append(tuple((str(op), as_int(j, f"{name}[{i}] input", low=0)) for op, j in edges))
    return tuple(nodes)


def _is_edge(e: Any) -> bool:
    return isinstance(e, (tuple, list)) and len(e) == 2 and isinstance(e[0], str)


def _concat(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, range):
        value = list(value)
    return tuple(as_int(v, f"{name}[{i}]", low=0) for i, v in enumerate(as_tuple(value, name)))


def _concat_str(concat: tuple[int, ...]) -> str:
    lo = concat[0] if concat else 0
    if concat and concat == tuple(range(lo, lo + len(concat))):
        return f"range({lo}, {lo + len(concat)})"
    return repr(list(concat))


@dataclass(frozen=True)
class Genotype(ArchIO):
    """A normal and a reduction cell: per node its (op, input) edges; inputs 0 and 1 are the cell's inputs,
    k >= 2 is node k - 2. `*_concat` lists the states the cell outputs (usually range(2, 2 + nodes))."""

    normal: Cell
    normal_concat: tuple[int, ...]
    reduce: Cell
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("normal", "reduce"):
            object.__setattr__(self, name, _cell(getattr(self, name), name))
            concat = _concat(getattr(self, f"{name}_concat"), f"{name}_concat")
            object.__setattr__(self, f"{name}_concat", concat)
            cell = getattr(self, name)
            for i, node in enumerate(cell):
                for op, j in node:
                    if op not in PRIMITIVES:
                        raise ValueError(f"{name}[{i}]: unknown op {op!r}; expected one of {list(PRIMITIVES)}")
                    if j >= i + 2:
                        raise ValueError(f"{name}[{i}] reads state {j}, but node {i} sees only states 0..{i + 1}")
            bad = [k for k in concat if not 0 <= k < len(cell) + 2]
            if bad:
                raise ValueError(f"{name}_concat names states {bad}; the cell has states 0..{len(cell) + 1}")

    # -- the reference's string form --------------------------------------------------------------
    def to_str(self) -> str:
        """The reference's repr (nested form), e.g. the strings in CDARTS/cells/*.json."""

        def cell(c: Cell) -> str:
            return "[" + ", ".join("[" + ", ".join(f"({op!r}, {j})" for op, j in node) + "]" for node in c) + "]"

        return (
            f"Genotype(normal={cell(self.normal)}, normal_concat={_concat_str(self.normal_concat)}, "
            f"reduce={cell(self.reduce)}, reduce_concat={_concat_str(self.reduce_concat)})"
        )

    def __str__(self) -> str:
        """Compact, for tables: `normal sep3<0 sep3<1 | ... ; reduce ...` (op <- input)."""

        def cell(c: Cell) -> str:
            return " | ".join(" ".join(f"{SHORT[op]}<{j}" for op, j in node) for node in c)

        return f"normal {cell(self.normal)} ; reduce {cell(self.reduce)}"

    @classmethod
    def from_str(cls, text: str, *, source: str = "genotype") -> Genotype:
        """Parse a `Genotype(...)` string safely (literals and `range(a, b)` only, never `eval`)."""
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as err:
            raise ValueError(f"{source}: not a Genotype(...) string: {err.msg}") from None
        if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "Genotype"):
            raise ValueError(f"{source}: expected Genotype(normal=..., reduce=...), got {text[:60]!r}")
        names = ("normal", "normal_concat", "reduce", "reduce_concat")
        values = dict(zip(names, (_literal(a, source) for a in tree.args)))
        values.update({kw.arg: _literal(kw.value, source) for kw in tree.keywords})
        missing = [n for n in names if n not in values]
        if missing or set(values) - set(names):
            raise ValueError(f"{source}: Genotype needs {list(names)}, got {sorted(values)}")
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    # -- plain forms ------------------------------------------------------------------------------
    def key(self) -> str:
        return self.to_str()

    def to_dict(self) -> dict[str, Any]:
        def cell(c: Cell) -> list:
            return [[[op, j] for op, j in node] for node in c]

        return {
            "normal": cell(self.normal),
            "normal_concat": list(self.normal_concat),
            "reduce": cell(self.reduce),
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "arch") -> Genotype:
        """`to_dict`'s keys, or {"genotype": "<Genotype(...) string>"}."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a genotype must be a mapping, got {type(data).__name__}")
        if set(data) == {"genotype"}:
            return cls.from_str(str(data["genotype"]), source=source)
        keys = {"normal", "normal_concat", "reduce", "reduce_concat"}
        if set(data) != keys:
            raise ValueError(f"{source}: genotype keys must be {sorted(keys)} (or 'genotype'), got {sorted(data)}")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_reference_json(cls, path: str | Path) -> Genotype:
        """A CDARTS `cells/*.json` file ({"0": str, "1": str, "2": str}, one string per stage). vitnas uses
        one cell pair for every stage (as CDARTS's search derives it), so the stages must agree."""
        import json

        data = json.loads(Path(path).read_text())
        if not isinstance(data, Mapping) or not data:
            raise ValueError(f"{path}: expected {{'0': 'Genotype(...)', ...}}")
        genotypes = {k: cls.from_str(v, source=f"{path}[{k}]") for k, v in data.items()}
        first = next(iter(genotypes.values()))
        differ = [k for k, g in genotypes.items() if g != first]
        if differ:
            raise ValueError(f"{path}: stages {differ} hold other cells than the first; vitnas uses one cell pair")
        return first

    def cells(self) -> tuple[tuple[str, Cell, tuple[int, ...]], ...]:
        return (("normal", self.normal, self.normal_concat), ("reduce", self.reduce, self.reduce_concat))


def _literal(node: ast.AST, source: str) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
        return list(range(*[_literal(a, source) for a in node.args]))
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, source) for e in node.elts]
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)):
        return node.value
    raise ValueError(f"{source}: unexpected {ast.dump(node)[:60]} in a genotype string")


def derive_genotype(
    normal: Sequence[Sequence[Sequence[float]]],
    reduce: Sequence[Sequence[Sequence[float]]],
    *,
    edge_weights: Sequence[Sequence[Sequence[float]]] | None = None,
    k: int = 2,
) -> Genotype:
    """The reference's `parse`: per node, score each incoming edge by its largest op weight other than
    'none' (times the edge weight, softmax(beta), when given), keep the top-k edges with their argmax op.
    `normal` / `reduce`: per node an (inputs, len(PRIMITIVES)) table of softmax(alpha)."""

    def cell(weights: Sequence, edges: Sequence | None) -> list:
        nodes = []
        for i, w in enumerate(weights):
            w = np.asarray(w, dtype=float)
            if edges is not None:
                w = w * np.asarray(edges[i], dtype=float)[:, None]
            w = w[:, : PRIMITIVES.index("none")]
            best_op = w.argmax(axis=1)
            score = w.max(axis=1)
            top = np.argsort(-score, kind="stable")[:k]
            nodes.append([(PRIMITIVES[int(best_op[j])], int(j)) for j in top])
        return nodes

    n_edges = edge_weights or (None, None)
    concat = list(range(2, 2 + len(normal)))
    return Genotype(cell(normal, n_edges[0]), concat, cell(reduce, n_edges[1]), concat)


# Published cells (microsoft/Cream CDARTS/CDARTS/cells/*.json; DARTS V2 from the DARTS paper's code).
PUBLISHED = {
    "cdarts_cifar": "Genotype(normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 2)], [('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('skip_connect', 0), ('skip_connect', 2)]], "
    "normal_concat=range(2, 6), reduce=[[('sep_conv_5x5', 1), ('max_pool_3x3', 0)], [('dil_conv_5x5', 2), "
    "('skip_connect', 0)], [('sep_conv_3x3', 0), ('sep_conv_5x5', 1)], [('sep_conv_3x3', 0), ('dil_conv_5x5', 2)]], "
    "reduce_concat=range(2, 6))",
    "cdarts_imagenet": "Genotype(normal=[[('sep_conv_3x3', 1), ('sep_conv_3x3', 0)], [('sep_conv_3x3', 0), "
    "('sep_conv_5x5', 2)], [('sep_conv_5x5', 2), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 1), ('sep_conv_5x5', 4)]], "
    "normal_concat=range(2, 6), reduce=[[('sep_conv_5x5', 1), ('avg_pool_3x3', 0)], [('max_pool_3x3', 1), "
    "('dil_conv_5x5', 2)], [('sep_conv_5x5', 1), ('dil_conv_5x5', 2)], [('sep_conv_3x3', 3), ('dil_conv_3x3', 4)]], "
    "reduce_concat=range(2, 6))",
    "darts_v2": "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])",
}


def published_genotype(name: str) -> Genotype:
    """A published cell pair by name: cdarts_cifar, cdarts_imagenet, darts_v2."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown published genotype {name!r}; choose one of {sorted(PUBLISHED)}")
    return Genotype.from_str(PUBLISHED[name], source=name)


@dataclass(frozen=True)
class DartsSpace(SpaceIO):
    """Cells of `n_nodes` nodes over `ops`; the network that a genotype becomes (`layers` cells per stage at
    `channels`, the CIFAR or ImageNet stem) and the smaller search network (`search_layers`,
    `search_channels`) that gradient-based search trains. Presets: `darts-cifar` (CDARTS's CIFAR layout:
    36 channels, 7+7+6 cells; search 16 channels, 3+3+2), `darts-imagenet` (48, 5+5+4 at 224 px),
    `darts-small` (16 channels, 2+2+2 at 32 px, a CPU budget) and `darts-tiny` (tests)."""

    arch_type: ClassVar[type] = Genotype
    kind_name: ClassVar[str] = "DARTS space"

    ops: tuple[str, ...] = PRIMITIVES[:-1]
    n_nodes: int = 4
    layout: str = "cifar"  # cifar: one 3x3 stem conv; imagenet: two stride-2 stems (the reference's)
    channels: int = 36
    layers: tuple[int, ...] = (7, 7, 6)
    search_channels: int = 16
    search_layers: tuple[int, ...] = (3, 3, 2)
    stem_multiplier: int = 3
    auxiliary: bool = True  # the retrained network's auxiliary head (after the second-to-last stage)
    img_size: int = 32
    name: str = "custom"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        ops = tuple(str(o) for o in as_tuple(self.ops, "ops"))
        bad = [o for o in ops if o not in PRIMITIVES or o == "none"]
        if bad or not ops:
            raise ValueError(f"ops {bad or '[]'} are not DARTS ops; choose from {list(PRIMITIVES[:-1])}")
        set_(self, "ops", ops)
        if self.layout not in ("cifar", "imagenet"):
            raise ValueError(f"layout must be 'cifar' or 'imagenet', got {self.layout!r}")
        for name in ("n_nodes", "channels", "search_channels", "stem_multiplier", "img_size"):
            set_(self, name, as_int(getattr(self, name), name, low=1))
        for name in ("layers", "search_layers"):
            value = tuple(as_int(v, f"{name}[{i}]", low=1) for i, v in enumerate(as_tuple(getattr(self, name), name)))
            if not value:
                raise ValueError(f"{name} must list the cells of at least one stage")
            set_(self, name, value)
        if len(self.layers) != len(self.search_layers):
            raise ValueError(f"layers has {len(self.layers)} stages, search_layers {len(self.search_layers)}")
        set_(self, "auxiliary", bool(self.auxiliary))

    # -- membership --------------------------------------------------------------------------------
    def violations(self, arch: Genotype) -> list[str]:
        if not isinstance(arch, Genotype):
            return [f"expected a Genotype, got {type(arch).__name__}"]
        out = []
        for name, cell, concat in arch.cells():
            if len(cell) != self.n_nodes:
                out.append(f"{name} has {len(cell)} nodes, the space {self.n_nodes}")
            for i, node in enumerate(cell):
                out += [f"{name}[{i}]: op {op!r} is not in the space's ops" for op, _ in node if op not in self.ops]
                inputs = [j for _, j in node]
                if len(node) != 2 or len(set(inputs)) != 2:
                    out.append(f"{name}[{i}] must read two different inputs, got {list(node)}")
            if tuple(concat) != tuple(range(2, 2 + self.n_nodes)):
                out.append(f"{name}_concat must be range(2, {2 + self.n_nodes}), got {list(concat)}")
        return out

    def capacity_violations(self, arch: Genotype) -> list[str]:
        """What a supernet of this space cannot run: wrong node count or an op it holds no weights for.
        Edge counts other than two are fine (a search network mixes all)."""
        return [v for v in self.violations(arch) if "two different inputs" not in v]

    # -- sampling and evolution --------------------------------------------------------------------
    def _node(self, i: int, rng: np.random.Generator) -> tuple[Edge, ...]:
        inputs = sorted(int(j) for j in rng.choice(i + 2, size=2, replace=False))
        return tuple((self.ops[int(rng.integers(len(self.ops)))], j) for j in inputs)

    def sample(self, rng: np.random.Generator) -> Genotype:
        concat = tuple(range(2, 2 + self.n_nodes))
        cells = [tuple(self._node(i, rng) for i in range(self.n_nodes)) for _ in range(2)]
        return Genotype(cells[0], concat, cells[1], concat)

    def mutate(self, arch: Genotype, rng: np.random.Generator, **ignored: Any) -> Genotype:
        """One edge of one cell changes: its op, or its input (kept different from the node's other one)."""
        cells = {"normal": [list(n) for n in arch.normal], "reduce": [list(n) for n in arch.reduce]}
        name = ("normal", "reduce")[int(rng.integers(2))]
        i, e = int(rng.integers(self.n_nodes)), int(rng.integers(2))
        op, j = cells[name][i][e]
        if rng.random() < 0.5:
            op = self.ops[int(rng.integers(len(self.ops)))]
        else:
            other = cells[name][i][1 - e][1]
            j = int(rng.choice([k for k in range(i + 2) if k != other]))
        cells[name][i][e] = (op, j)
        return Genotype(cells["normal"], arch.normal_concat, cells["reduce"], arch.reduce_concat)

    def crossover(self, a: Genotype, b: Genotype, rng: np.random.Generator) -> Genotype:
        """Each node of each cell from either parent."""
        normal = [na if rng.random() < 0.5 else nb for na, nb in zip(a.normal, b.normal)]
        reduce = [na if rng.random() < 0.5 else nb for na, nb in zip(a.reduce, b.reduce)]
        return Genotype(normal, a.normal_concat, reduce, a.reduce_concat)

    # -- encodings ---------------------------------------------------------------------------------
    def genome_upper(self) -> list[int]:
        """Per cell, per node: the two inputs as (first, gap) and the two ops."""
        out = []
        for _ in range(2):
            for i in range(self.n_nodes):
                out += [i, i, len(self.ops) - 1, len(self.ops) - 1]
        return out

    def from_genome(self, x: Any) -> Genotype:
        x = [int(round(float(v))) for v in x]
        if len(x) != len(self.genome_upper()):
            raise ValueError(f"a genome of space {self.name!r} has {len(self.genome_upper())} genes, got {len(x)}")
        cells, g = [], 0
        for _ in range(2):
            nodes = []
            for i in range(self.n_nodes):
                first = min(x[g], i)
                second = first + 1 + min(x[g + 1], i - first)  # always a second, different input
                nodes.append(((self.ops[x[g + 2]], first), (self.ops[x[g + 3]], min(second, i + 1))))
                g += 4
            cells.append(nodes)
        concat = tuple(range(2, 2 + self.n_nodes))
        return Genotype(cells[0], concat, cells[1], concat)

    def features(self, archs: Any) -> np.ndarray:
        """(N, F) in [0, 1]: per cell, per (node, input) the op's cost rank (0: no edge)."""
        rank = {op: (OP_COST_ORDER.index(op) + 1) / len(OP_COST_ORDER) for op in OP_COST_ORDER}
        rows = []
        for a in archs:
            row = []
            for _, cell, _ in a.cells():
                for i, node in enumerate(cell):
                    used = {j: rank.get(op, 0.0) for op, j in node}
                    row += [used.get(j, 0.0) for j in range(i + 2)]
            rows.append(row)
        return np.asarray(rows, dtype=float)

    # -- extremes and size -------------------------------------------------------------------------
    def _uniform(self, op: str) -> Genotype:
        concat = tuple(range(2, 2 + self.n_nodes))
        cell = tuple(((op, 0), (op, 1)) for _ in range(self.n_nodes))
        return Genotype(cell, concat, cell, concat)

    def smallest(self) -> Genotype:
        return self._uniform(min(self.ops, key=OP_COST_ORDER.index))

    def largest(self) -> Genotype:
        return self._uniform(max(self.ops, key=OP_COST_ORDER.index))

    def size(self) -> int:
        """Distinct genotypes (input pairs unordered, ops per edge)."""
        n = len(self.ops)
        per_cell = math.prod(math.comb(i + 2, 2) * n * n for i in range(self.n_nodes))
        return per_cell * per_cell


_PRESETS: dict[str, DartsSpace] = {
    "darts-cifar": DartsSpace(name="darts-cifar"),
    "darts-imagenet": DartsSpace(layout="imagenet", channels=48, layers=(5, 5, 4), img_size=224, name="darts-imagenet"),
    # A CPU budget for CIFAR-10 at 32 px: the eval network 16 channels x 2+2+2 cells, search 8 x 1+1+1.
    "darts-small": DartsSpace(
        channels=16, layers=(2, 2, 2), search_channels=8, search_layers=(1, 1, 1), name="darts-small"
    ),
    "darts-tiny": DartsSpace(
        channels=4,
        layers=(1, 1, 1),
        search_channels=4,
        search_layers=(1, 1, 1),
        stem_multiplier=1,
        img_size=16,
        auxiliary=False,
        name="darts-tiny",
    ),
}

DartsSpace._presets = _PRESETS
