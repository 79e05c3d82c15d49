"""Analytic parameter and multiply-accumulate counts of ViT subnets (pure Python, microseconds).

MACs count every matrix product the model runs, as `torch.utils.flop_counter` sees them: the patch
convolution, q/k/v, q.k^T, attn.v, the projection, the MLP, the head, and the relative-position
products in the form vitnas computes them (q @ tables^T and bucketed-attention @ tables, 2T rows
each). The reference's per-pair form costs 2 * L^2 * heads * head_dim per layer instead; LayerNorm,
softmax, GELU and additions are not counted (the usual convention of the papers' FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vitnas.space.arch import ArchConfig

if TYPE_CHECKING:
    from vitnas.models.config import ViTConfig

__all__ = ["ViTCostModel"]


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


@dataclass(frozen=True)
class ViTCostModel:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    head_dim: int = 64
    qkv_bias: bool = True
    rel_pos_max: int | None = 14  # None: no relative position
    abs_pos: bool = True
    irpe: dict | None = None  # iRPE settings (vitnas.nn.irpe.IRPEConfig fields); None: no iRPE

    @classmethod
    def from_config(cls, config: ViTConfig) -> ViTCostModel:
        """The costs of ViTs built with `config` (a `vitnas.models.config.ViTConfig`; drop rates play no part)."""
        return cls(
            img_size=config.img_size,
            patch_size=config.patch_size,
            in_chans=config.in_chans,
            num_classes=config.num_classes,
            head_dim=config.head_dim,
            qkv_bias=config.qkv_bias,
            rel_pos_max=config.rel_pos_distance,
            abs_pos=config.abs_pos,
            irpe=dict(config.irpe) if config.irpe else None,
        )

    def _irpe(self) -> tuple[str, int, int, bool]:
        """(letters on, buckets per table, tables per letter, contextual)."""
        if not self.irpe:
            return "", 0, 0, False
        from vitnas.nn.irpe import IRPEConfig, num_buckets

        cfg = IRPEConfig(**self.irpe)
        return cfg.on, num_buckets(cfg), 2 if cfg.method == "cross" else 1, cfg.mode == "contextual"

    def num_tokens(self, img_size: int | Sequence[int] | None = None, patch_size: int | None = None) -> int:
        h, w = _pair(self.img_size if img_size is None else img_size)
        p = patch_size or self.patch_size
        return (h // p) * (w // p) + 1

    def _rel_rows(self) -> int:
        return 0 if not self.rel_pos_max else 2 * self.rel_pos_max + 2

    def params(self, arch: ArchConfig) -> int:
        e, hd, C = arch.embed_dim, self.head_dim, self.num_classes
        p = arch.patch_size or self.patch_size  # ViTAS archs carry their own patch size
        total = e * self.in_chans * p**2 + e  # patch embedding
        total += e  # class token
        if self.abs_pos:
            total += e * self.num_tokens(patch_size=p)
        rel = 2 * 2 * self._rel_rows() * hd  # K and V modules, vertical and horizontal tables
        on, nb, tables, ctx = self._irpe()
        shared = bool(self.irpe and self.irpe.get("shared_head", True))
        for h, m in zip(arch.num_heads, arch.hidden_dims()):
            heads = 1 if shared else h
            total += len(on) * tables * heads * nb * (hd if ctx else 1)  # iRPE tables
            w = h * hd
            total += 2 * e  # norm1
            total += e * 3 * w + (3 * w if self.qkv_bias else 0)
            total += w * e + e  # proj
            total += rel
            total += 2 * e  # norm2
            total += e * m + m + m * e + e  # fc1, fc2
        total += 2 * e  # final norm
        if C > 0:
            total += e * C + C
        return total

    def macs(self, arch: ArchConfig, img_size: int | Sequence[int] | None = None) -> int:
        e, hd, C = arch.embed_dim, self.head_dim, self.num_classes
        on, nb, tables, ctx = self._irpe()
        p = arch.patch_size or self.patch_size
        L = self.num_tokens(img_size, p)
        total = (L - 1) * e * self.in_chans * p**2
        T2 = 2 * self._rel_rows()
        for h, m in zip(arch.num_heads, arch.hidden_dims()):
            w = h * hd
            total += L * e * 3 * w  # qkv
            total += 2 * h * L * L * hd  # q.k^T and attn.v
            if T2:
                total += 2 * h * L * T2 * hd  # q @ tables^T (keys) and buckets @ tables (values)
            if ctx:  # iRPE: x @ table (q, k) and bucketed attention @ table (v), per letter and table
                total += len(on) * tables * h * L * nb * hd
            total += L * w * e  # proj
            total += 2 * L * e * m  # fc1, fc2
        if C > 0:
            total += e * C
        return total
