"""`vitnas <verb>`: thin wrappers over plain library functions."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

import numpy as np

from vitnas.space import ArchConfig, SearchSpace

log = logging.getLogger("vitnas")


def _space_from_args(args: argparse.Namespace) -> SearchSpace:
    return SearchSpace.from_yaml(args.space_yaml) if args.space_yaml else SearchSpace.preset(args.space)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a space's supernet, sample subnets, print their costs, run one forward and extract."""
    import torch

    from vitnas.supernet import ViTSupernet

    torch.manual_seed(args.seed)
    space = _space_from_args(args)
    print(
        f"search space {space.name!r}: {space.size():.3e} archs; embed {list(space.embed_dim)}, "
        f"depth {list(space.depth)}, mlp_ratio {list(space.mlp_ratio)}, num_heads {list(space.num_heads)}"
    )
    t0 = time.perf_counter()
    net = ViTSupernet(space, num_classes=args.num_classes).eval()
    n_super = sum(p.numel() for p in net.parameters())
    print(
        f"supernet: {n_super / 1e6:.2f}M parameters at {net.img_size[0]}px, patch {net.patch_size} "
        f"(built in {time.perf_counter() - t0:.1f}s)"
    )
    rng = np.random.default_rng(args.seed)
    archs = [("smallest", space.smallest()), ("largest", space.largest())]
    archs += [(f"sample {i + 1}", space.sample(rng)) for i in range(args.samples)]
    rows = []
    for label, arch in archs:
        rows.append(
            [
                label,
                str(arch.embed_dim),
                str(arch.depth),
                f"{np.mean(arch.mlp_ratios):.2f}",
                f"{np.mean(arch.num_heads):.2f}",
                f"{net.num_params(arch) / 1e6:.2f}M",
                f"{net.num_macs(arch) / 1e9:.3f}G",
            ]
        )
    print(_table(rows, ["subnet", "embed_dim", "depth", "mean mlp", "mean heads", "params", "MACs"]))
    arch = archs[-1][1]
    x = torch.randn(2, 3, *net.img_size)
    with torch.inference_mode(), net.active(arch):
        t0 = time.perf_counter()
        y_super = net(x)
        dt = time.perf_counter() - t0
    sub = net.extract(arch).eval()
    with torch.inference_mode():
        y_sub = sub(x)
    print(
        f"forward of {arch.key()} on a batch of 2: logits {tuple(y_super.shape)} in {dt * 1e3:.0f} ms; "
        f"extracted model agrees to {(y_super - y_sub).abs().max().item():.1e}"
    )
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    """Parameters and MACs of an arch YAML (ours or AutoFormer's RETRAIN section)."""
    from vitnas.costs import ViTCostModel

    space = _space_from_args(args)
    arch = ArchConfig.from_yaml(args.arch)
    problems = space.capacity_violations(arch)
    if problems:
        print(f"warning: {args.arch}: {problems[0]}", file=sys.stderr)
    costs = ViTCostModel(
        img_size=args.img_size or space.img_size,
        patch_size=space.patch_size,
        num_classes=args.num_classes,
        head_dim=space.head_dim,
        rel_pos_max=space.rel_pos_max,
    )
    print(f"{arch.key()}: {costs.params(arch):,} parameters, {costs.macs(arch) / 1e9:.3f} GMACs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitnas", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_space_args(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("--space", default=default, choices=SearchSpace.presets(), help="search space preset")
        p.add_argument("--space-yaml", help="search space YAML (ours or AutoFormer's); overrides --space")
        p.add_argument("--num-classes", type=int, default=1000)

    demo = sub.add_parser("demo", help="build a supernet, sample subnets, show their costs, run a forward")
    add_space_args(demo, "autoformer-tiny")
    demo.add_argument("--samples", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    costs = sub.add_parser("costs", help="parameters and MACs of an arch YAML")
    add_space_args(costs, "autoformer-tiny")
    costs.add_argument("arch", help="arch YAML (ours, or an AutoFormer subnet config)")
    costs.add_argument("--img-size", type=int)
    costs.set_defaults(func=cmd_costs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
