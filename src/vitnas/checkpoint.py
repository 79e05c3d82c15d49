"""The checkpoint file format, and nothing else: one safetensors file holding tensor groups (model
weights, optimizer states, EMA, RNG, a task's own tensors) with JSON metadata (config, model spec,
step, ...). Written atomically; reading never unpickles anything. Who builds the model from it is
`vitnas.models.spec`; what goes in it is the trainer's and its task's business.

Tensor names: `model.<key>`, `ema.<key>`, `rng.<name>`, `task.<name>`, and `optim.<param id>.<state>`
for the main optimizer (its non-tensor state under metadata "optimizer"), `optim_<name>.<param id>.
<state>` for a task's extra optimizer `name` (metadata "optimizers" -> name)."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from vitnas._io import atomic_save_safetensors, corrupt_file_error

__all__ = ["FORMAT", "optimizer_state", "read_checkpoint", "read_metadata", "save_checkpoint"]

log = logging.getLogger(__name__)
FORMAT = "vitnas-checkpoint-1"


def _flatten_optimizer(state: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    *,
    weights: dict[str, torch.Tensor],
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    task: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write one checkpoint atomically. `meta` must be JSON; it should hold the model spec as "model"."""
    tensors = {f"model.{k}": v.detach() for k, v in weights.items()}
    meta = {**meta, "format": FORMAT}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict(), "optim")
        tensors.update(opt_tensors)
    for name, opt in (extra_optimizers or {}).items():
        opt_tensors, meta.setdefault("optimizers", {})[name] = _flatten_optimizer(opt.state_dict(), f"optim_{name}")
        tensors.update(opt_tensors)
    for group, values in (("ema", ema), ("rng", rng), ("task", task)):
        for name, value in (values or {}).items():
            tensors[f"{group}.{name}"] = value.detach()
    atomic_save_safetensors(
        {k: v.cpu().contiguous() for k, v in tensors.items()}, path, metadata={"vitnas": json.dumps(meta)}
    )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata (config, model description, step, ...) without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header["vitnas"])
    except KeyError:
        raise ValueError(
            f"{path}: missing key 'vitnas' in the safetensors metadata (not a vitnas checkpoint)"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the 'vitnas' metadata is not valid JSON ({err})") from None
    except Exception as err:
        raise corrupt_file_error(path, err) from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_checkpoint(
    path: str | Path, only: Collection[str] | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """({'model': ..., 'optim': ..., 'ema': ..., 'rng': ..., 'task': ..., 'optim_<name>': ...} tensors,
    metadata); `only` names the groups
    whose tensors are read (the others stay empty), e.g. ('model',) to skip the optimizer state."""
    from safetensors import safe_open

    meta = read_metadata(path)  # existence, format and metadata checks
    try:
        with safe_open(str(path), framework="pt") as f:
            groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}, "ema": {}, "rng": {}, "task": {}}
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                group, _, rest = key.partition(".")
                if only is not None and group not in only:
                    continue
                if group == "optim" or group.startswith("optim_"):  # keeps its full name (prefix.pid.state)
                    groups.setdefault(group, {})[key] = f.get_tensor(key)
                else:
                    groups.setdefault(group, {})[rest] = f.get_tensor(key)
    except Exception as err:
        raise corrupt_file_error(path, err) from None
    return groups, meta


def optimizer_state(
    groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any], name: str | None = None
) -> dict[str, Any] | None:
    """The state dict of the main optimizer (`name` None) or of extra optimizer `name`; None if not saved."""
    if name is None:
        return _unflatten_optimizer(groups["optim"], meta["optimizer"]) if "optimizer" in meta else None
    saved = meta.get("optimizers", {})
    return _unflatten_optimizer(groups.get(f"optim_{name}", {}), saved[name]) if name in saved else None
