"""A check shared by the tests of every non-ViT space: strategies know a space only through its protocol."""

from __future__ import annotations

import pytest

from vitnas.search import Constraints, build_strategy, run_search


def check_search_and_resume(tmp_path, name, space, net, accuracy, *, max_macs, crash_at):
    """Run strategy `name` on `space` (costs from the supernet `net`), then again interrupted after `crash_at`
    evaluations and resumed: the same candidates, all within `max_macs` and the space, and `best.yaml` naming
    the best arch. Returns the uninterrupted run."""
    costs = {"params": net.num_params, "macs": net.num_macs}
    window = Constraints.from_dict({"macs": [None, max_macs]})

    def search(out, evaluate):
        strategy = build_strategy(
            name,
            space,
            feasible=lambda a: net.num_macs(a) <= max_macs,
            cost=net.num_macs,
            seed=0,
            generations=3,
            population=12,
            parents=4,
            mutations=6,
            crossovers=4,
        )
        return run_search(strategy, evaluate, costs=costs, constraints=window, out_dir=out, resume=True)

    full = search(tmp_path / "full", accuracy)
    calls = []

    def crashing(arch):
        calls.append(arch)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return accuracy(arch)

    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "part", crashing)
    resumed = search(tmp_path / "part", accuracy)
    assert [r["key"] for r in resumed.candidates] == [r["key"] for r in full.candidates]
    assert len(full.candidates) > crash_at and all(r["macs"] <= max_macs for r in full.candidates)
    assert all(space.contains(space.arch_from_dict(r["arch"])) for r in full.candidates)
    assert space.arch_type.from_yaml(tmp_path / "full" / "best.yaml").key() == full.best["key"]
    return full
