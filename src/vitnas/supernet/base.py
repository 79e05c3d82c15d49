"""The part of the supernet protocol that does not depend on the network: which arch runs now.

`set_active(arch)` / `with net.active(arch): ...` / `net.arch` / `check_arch(arch)`; the kinds add
`forward`, `extract(arch)`, `num_params(arch)`, `num_macs(arch)` and hold `space`. `side` (bilateral
slicing, BCNet / ViTAS) is accepted everywhere so callers need not know the kind; only the ViT supernet
slices from the right.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

__all__ = ["ActiveArch"]


class ActiveArch:
    """Mixin for supernets whose arch type is `arch_type` and whose space says what fits its weights."""

    arch_type: ClassVar[type] = object
    space: Any
    _arch: Any

    @property
    def arch(self) -> Any:
        return self._arch

    def check_arch(self, arch: Any) -> Any:
        """`arch`, or an error naming the first way it does not fit the supernet's weights."""
        if not isinstance(arch, self.arch_type):
            raise TypeError(f"expected an {self.arch_type.__name__}, got {type(arch).__name__}")
        problems = self.space.capacity_violations(arch)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(f"arch does not fit the supernet: {problems[0]}{more}")
        return arch

    def set_active(self, arch: Any, side: str = "left") -> None:
        """Run `arch` from now on."""
        self._arch = self.check_arch(arch)

    @contextlib.contextmanager
    def active(self, arch: Any, side: str = "left") -> Iterator[Any]:
        """`with net.active(arch): net(x)` runs `arch` and restores the previous arch afterwards."""
        previous = self._arch
        self.set_active(arch, side)
        try:
            yield self
        finally:
            self._arch = previous
