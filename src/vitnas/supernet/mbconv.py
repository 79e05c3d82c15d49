"""Cream's weight-sharing MobileNet-style supernet (microsoft/Cream, `Cream/lib/models/structures/supernet.py`).

Unlike AutoFormer's weight-entangled ViT, every searched layer holds one whole block per op choice (its own
convs, squeeze-excite and BatchNorms), as Cream's supernet does; a subnet runs, in each stage, the chosen
block of its first `depth` layers and skips the rest. Module names follow the reference
(`blocks.{stage}.{layer}.{choice}`), so the blocks of a reference supernet load by name when the space's
`max_depths` match it.

The protocol is `ViTSupernet`'s: `set_active(arch)` / `with net.active(arch):` choose the path that
`forward` runs, `extract(arch)` returns a plain `CreamNet` holding copies of that path's weights, and
`num_params` / `num_macs` are arithmetic over the space (no model is built).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.models.cream import (
    CreamNet,
    build_block,
    cn_spec,
    cream_config,
    cream_macs,
    cream_params,
    ds_spec,
    init_weights,
    ir_spec,
    pooled_head,
)
from vitnas.space.mbconv import MBConvArch, MBConvSpace
from vitnas.supernet.base import ActiveArch

__all__ = ["MBConvSupernet"]

log = logging.getLogger(__name__)


class MBConvSupernet(ActiveArch, nn.Module):
    """Single-path supernet over an `MBConvSpace`: one block per (layer, op) pair.

    `drop_rate` is the dropout before the classifier; `drop_path_rate` grows linearly over the supernet's
    blocks as in the reference (rate * block index / block count, stage 0 and the last conv counted), so
    a layer keeps its rate whatever the depth of the subnet running it, and `extract` hands those rates
    on. `img_size` (default: the space's) is the input size costs are counted at; the network itself runs
    at any size. `init_kwargs` rebuilds it: `MBConvSupernet(space, **net.init_kwargs)`.
    """

    arch_type = MBConvArch

    def __init__(
        self,
        space: MBConvSpace,
        num_classes: int = 1000,
        *,
        img_size: int | None = None,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(space, MBConvSpace):
            raise TypeError(f"expected an MBConvSpace, got {type(space).__name__}")
        self.space = space
        self.num_classes = int(num_classes)
        self.img_size = space.img_size if img_size is None else int(img_size)
        self.in_chans = int(in_chans)
        self.drop_rate = float(drop_rate)
        self.init_kwargs: dict[str, Any] = dict(
            num_classes=self.num_classes,
            img_size=img_size,
            in_chans=self.in_chans,
            drop_rate=self.drop_rate,
            drop_path_rate=float(drop_path_rate),
        )
        self.max_depth = sum(space.max_depths)
        count = self.max_depth + 2
        self.drop_path_rates = tuple(float(drop_path_rate) * (i + 1) / count for i in range(self.max_depth))
        # where each stage's layers start in drop_path_rates
        self._offsets = [sum(space.max_depths[:s]) for s in range(space.num_stages)]
        self._build()
        self._arch = space.largest()

    def _build(self) -> None:
        sp = self.space
        self.conv_stem = nn.Conv2d(self.in_chans, sp.stem_channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(sp.stem_channels)
        self.blocks = nn.ModuleList([_single(ds_spec(sp.stem_channels, sp.stage0_channels, sp.se_ratio))])
        cin, i = sp.stage0_channels, 0
        for cout, stride, cap in zip(sp.channels, sp.strides, sp.max_depths):
            layers = nn.ModuleList()
            for j in range(cap):
                rate = self.drop_path_rates[i]
                specs = (ir_spec(cin, cout, k, e, stride if j == 0 else 1, sp.se_ratio, rate) for k, e in sp.ops)
                layers.append(nn.ModuleList(map(build_block, specs)))
                cin, i = cout, i + 1
            self.blocks.append(layers)
        self.blocks.append(_single(cn_spec(cin, sp.last_channels)))
        self.conv_head = nn.Conv2d(sp.last_channels, sp.head_channels, 1)
        self.classifier = nn.Linear(sp.head_channels, self.num_classes) if self.num_classes > 0 else nn.Identity()
        init_weights(self)

    # -- forward -----------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # as CreamNet: faster depthwise convs on CPU
        x = self.blocks[0][0][0](F.silu(self.bn1(self.conv_stem(x))))
        for stage, ops in zip(self.blocks[1:-1], self._arch.stages):
            for layer, op in zip(stage, ops):  # layers past the stage's depth are skipped
                x = layer[op](x)
        return self.blocks[-1][0][0](x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return pooled_head(self, x, pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- extraction --------------------------------------------------------------------------------
    def child_config(self, arch: MBConvArch | None = None, img_size: int | None = None) -> dict[str, Any]:
        """The `CreamNet` config of a subnet: its ops, the space's widths, and the drop-path rates its
        layers train with here."""
        arch = self._arch if arch is None else self.check_arch(arch)
        sp = self.space
        rates = [self.drop_path_rates[i + j] for i, ops in zip(self._offsets, arch.stages) for j in range(len(ops))]
        return cream_config(
            stages=[[list(sp.ops[op]) for op in ops] for ops in arch.stages],
            channels=sp.channels,
            strides=sp.strides,
            img_size=self.img_size if img_size is None else img_size,
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            stem_channels=sp.stem_channels,
            stage0_channels=sp.stage0_channels,
            last_channels=sp.last_channels,
            head_channels=sp.head_channels,
            se_ratio=sp.se_ratio,
            drop_rate=self.drop_rate,
            drop_path_rate=rates,
        )

    def active_state_dict(self, arch: MBConvArch | None = None) -> dict[str, Tensor]:
        """The subnet's weights and BatchNorm statistics (detached views), keyed as in `CreamNet`."""
        arch = self._arch if arch is None else self.check_arch(arch)
        out: dict[str, Tensor] = {}
        for name in ("conv_stem", "bn1", "conv_head", "classifier"):
            out.update(getattr(self, name).state_dict(prefix=f"{name}."))
        out.update(self.blocks[0][0][0].state_dict(prefix="blocks.0.0."))
        for s, ops in enumerate(arch.stages, 1):
            for j, op in enumerate(ops):
                out.update(self.blocks[s][j][op].state_dict(prefix=f"blocks.{s}.{j}."))
        last = len(self.blocks) - 1
        out.update(self.blocks[last][0][0].state_dict(prefix=f"blocks.{last}.0."))
        return out

    def extract(self, arch: MBConvArch | None = None, side: str | None = None) -> CreamNet:
        """A standalone `CreamNet` with copies of the subnet's weights (default: the active arch), in the
        supernet's train/eval mode. It is the arch as trained here: no reference quirks applied."""
        config = self.child_config(arch)
        with torch.device("meta"):  # no random init: every tensor is assigned below
            model = CreamNet(**config)
        with torch.no_grad():
            state = {k: v.clone(memory_format=torch.contiguous_format) for k, v in self.active_state_dict(arch).items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.train(self.training)

    # -- costs -------------------------------------------------------------------------------------
    def num_params(self, arch: MBConvArch | None = None) -> int:
        """Exact parameter count of the subnet (what `extract(arch)` holds), by arithmetic."""
        return cream_params(self.child_config(arch))

    def num_macs(self, arch: MBConvArch | None = None, img_size: int | None = None) -> int:
        """Multiply-accumulates of one image's forward pass (default: at `img_size`), by arithmetic; see
        `vitnas.models.cream.cream_macs`."""
        return cream_macs(self.child_config(arch), img_size)


def _single(spec: Any) -> nn.ModuleList:
    """A fixed stage: one layer with one choice, nested as the searched ones (`blocks.{i}.0.0`)."""
    return nn.ModuleList([nn.ModuleList([build_block(spec)])])
