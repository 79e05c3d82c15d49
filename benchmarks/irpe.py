"""Contextual product iRPE on keys (DeiT-Ti, 224px, batch 32): forward + backward time of vitnas's
bucketed form against the naive per-pair (L, L, head_dim) form; one JSON line.

Two figures: the iRPE term alone (one layer's q -> logits term, 12 times), and a whole DeiT-Ti
training step (forward + backward) with each form.

    python benchmarks/irpe.py [--threads 2] [--batch 32]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from _timing import median_seconds
from vitnas.models.vit import VisionTransformer
from vitnas.nn import irpe as irpe_mod


def naive_forward(self, x, grid=None, head_dim=None):
    """The per-pair form: gather an (L, L, d) embedding per table and contract it with q."""
    L = x.shape[2]
    ids = self.ids(L, grid, x.device)
    table = self.lookup_table_weight[:, : head_dim or self.head_dim]  # (Hn, d, nb)
    emb = table[:, :, ids].permute(0, 2, 3, 1)  # (Hn, L, L, d)
    return torch.einsum("bhid,hijd->bhij", x, emb.expand(x.shape[1], -1, -1, -1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = irpe_mod.IRPEConfig(on="k")
    module = irpe_mod.IRPE(cfg, 64, 3, transposed=True)
    torch.nn.init.normal_(module.lookup_table_weight)
    q = torch.randn(args.batch, 3, 197, 64, requires_grad=True)
    efficient_forward = irpe_mod.IRPE.forward

    def op_step():
        for _ in range(12):
            module(q, (14, 14)).sum().backward()

    model = VisionTransformer(
        embed_dim=192,
        depth=12,
        num_heads=3,
        mlp_ratios=4.0,
        rel_pos=False,
        global_pool="token",
        norm_eps=1e-6,
        irpe={"on": "k"},
    ).train()
    opt_x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))

    def model_step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(opt_x), y).backward()

    out = {
        "benchmark": "irpe",
        "threads": args.threads,
        "batch": args.batch,
        "torch": torch.__version__,
        "setting": "DeiT-Ti 224px, contextual product shared-head iRPE on K, 50 buckets",
    }
    for name, forward in (("bucketed", efficient_forward), ("naive", naive_forward)):
        irpe_mod.IRPE.forward = forward
        out[f"irpe_term_fwd_bwd_ms_{name}"] = round(1e3 * median_seconds(op_step, args.reps), 1)
        out[f"deit_ti_step_s_{name}"] = round(median_seconds(model_step, args.reps), 3)
    irpe_mod.IRPE.forward = efficient_forward
    out["irpe_term_speedup"] = round(out["irpe_term_fwd_bwd_ms_naive"] / out["irpe_term_fwd_bwd_ms_bucketed"], 2)
    out["deit_ti_step_speedup"] = round(out["deit_ti_step_s_naive"] / out["deit_ti_step_s_bucketed"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
