"""Named search spaces, as plain data: the `SearchSpace` keyword arguments of each, by name.

`SearchSpace.preset(name)` builds them; this module imports no space type. The AutoFormer ones copy
the reference's supernet and choices exactly.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    # AutoFormer, experiments/supernet/supernet-{T,S,B}.yaml: capacity embed/heads/mlp/depth, then choices.
    "autoformer-tiny": dict(
        embed_dim=(192, 216, 240),
        depth=(12, 13, 14),
        mlp_ratio=(3.5, 4.0),
        num_heads=(3, 4),
        max_embed_dim=256,
        max_depth=14,
        max_mlp_ratio=4.0,
        max_num_heads=4,
        name="autoformer-tiny",
    ),
    "autoformer-small": dict(
        embed_dim=(320, 384, 448),
        depth=(12, 13, 14),
        mlp_ratio=(3.0, 3.5, 4.0),
        num_heads=(5, 6, 7),
        max_embed_dim=448,
        max_depth=14,
        max_mlp_ratio=4.0,
        max_num_heads=7,
        name="autoformer-small",
    ),
    "autoformer-base": dict(
        embed_dim=(528, 576, 624),
        depth=(14, 15, 16),
        mlp_ratio=(3.0, 3.5, 4.0),
        num_heads=(9, 10),
        max_embed_dim=640,
        max_depth=16,
        max_mlp_ratio=4.0,
        max_num_heads=10,
        name="autoformer-base",
    ),
    # 32x32 images, patch 4 (an 8x8 grid, so relative distances never exceed 7), head dim 32: the
    # largest subnet is ~0.13 GMACs, so a supernet trains at a useful speed on 2 CPU cores.
    "cifar": dict(
        embed_dim=(96, 128, 160),
        depth=(4, 5, 6),
        mlp_ratio=(2.0, 3.0, 4.0),
        num_heads=(2, 3, 4),
        head_dim=32,
        img_size=32,
        patch_size=4,
        rel_pos_max=7,
        name="cifar",
    ),
    # The embedded digits (8x8 images shown at 16px, patch 4: a 4x4 grid): the demo's space, which
    # trains and searches in minutes on 2 CPU cores.
    "digits": dict(
        embed_dim=(48, 64, 96),
        depth=(2, 3, 4),
        mlp_ratio=(2.0, 3.0, 4.0),
        num_heads=(2, 3, 4),
        head_dim=16,
        img_size=16,
        patch_size=4,
        rel_pos_max=3,
        name="digits",
    ),
}
