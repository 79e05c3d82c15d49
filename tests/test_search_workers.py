"""A search spread over ranks (gloo, two processes): each rank evaluates a disjoint share of every
generation, the results and artefacts equal a one-process run with the same seed, and a run whose rank
died mid-search resumes to the same end."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from test_search import COSTS, SPACE, costs, fake_accuracy
from vitnas.search import Constraints, Workers, build_strategy, run_search, torch_workers

ARTEFACTS = ("candidates.jsonl", "state.json", "pareto.json", "best.yaml", "progress.json", "config.json")


def _search(out: Path, workers: Workers | None = None, evaluate=fake_accuracy):
    constraints = Constraints.from_dict({"params": [None, 8.0e6]})
    feasible = lambda a: constraints.satisfied({k: f(a) for k, f in costs().items()})  # noqa: E731
    strategy = build_strategy(
        "evolution", SPACE, feasible=feasible, cost=COSTS.params, seed=3, generations=4, population=12,
        parents=4, mutations=4, crossovers=4,
    )  # fmt: skip
    return run_search(
        strategy, evaluate, costs=costs(), constraints=constraints, out_dir=out, workers=workers or Workers()
    )


class _DiesAt:
    """An evaluator that kills its process (as kill -9 would) at its n-th evaluation."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, arch):
        self.calls += 1
        if self.calls == self.n:
            os._exit(9)
        return fake_accuracy(arch)


def _rank(rank: int, world: int, init: str, out: str, die_at: int | None, record: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20)
    )
    try:
        calls = []

        def evaluate(arch):
            calls.append(arch.key())
            return fake_accuracy(arch)

        dies = _DiesAt(die_at) if die_at is not None and rank == 1 else None
        result = _search(Path(out), torch_workers(), dies or evaluate)
        Path(f"{record}.{rank}").write_text("\n".join(calls) + f"\n#{result.evaluations}")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, name: str, die_at: int | None = None) -> None:
    init = tmp_path / f"init-{name}-{die_at}"
    args = (2, str(init), str(tmp_path / name), die_at, str(tmp_path / f"calls-{name}"))
    mp.start_processes(_rank, args=args, nprocs=2, start_method="spawn")


def _read(folder: Path) -> dict[str, str]:
    return {name: (folder / name).read_text() for name in ARTEFACTS}


def test_two_ranks_share_the_work_and_write_what_one_process_writes(tmp_path):
    one = _search(tmp_path / "one")
    _spawn(tmp_path, "two")
    assert _read(tmp_path / "two") == _read(tmp_path / "one")
    calls = [(tmp_path / f"calls-two.{r}").read_text().splitlines() for r in (0, 1)]
    done = [set(c[:-1]) - {""} for c in calls]
    assert not done[0] & done[1]  # disjoint shares
    assert done[0] | done[1] == {r["key"] for r in one.candidates}
    assert min(len(d) for d in done) >= len(one.candidates) // 2 - 4  # both ranks carry about half
    assert calls[0][-1] == calls[1][-1] == f"#{one.evaluations}"  # every rank saw every evaluation


def test_a_rank_dying_mid_search_resumes_to_the_same_end(tmp_path):
    _search(tmp_path / "one")
    # rank 1 exits at its 9th evaluation; rank 0 times out in the gather
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        _spawn(tmp_path, "two", die_at=9)
    kept = (tmp_path / "two" / "candidates.jsonl").read_text().splitlines()
    assert 0 < len(kept) < len((tmp_path / "one" / "candidates.jsonl").read_text().splitlines())
    _spawn(tmp_path, "two")  # the same command again
    assert _read(tmp_path / "two") == _read(tmp_path / "one")
    resumed = [(tmp_path / f"calls-two.{r}").read_text().splitlines()[:-1] for r in (0, 1)]
    assert not set(sum(resumed, [])) & {json.loads(line)["key"] for line in kept}  # none redone


def _pipeline_rank(rank: int, world: int, port: int, config: dict) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from vitnas.pipeline import PipelineConfig, run_pipeline

    try:
        run_pipeline(PipelineConfig(**config), device="cpu")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pipeline_search_under_two_ranks_equals_one_process(tmp_path):
    from test_pipeline import QUICK
    from vitnas.pipeline import PipelineConfig, run_pipeline

    search = {**QUICK["search"], "constraints": {"params": [None, 120000], "latency_ms": [None, 1000]}}
    base = {**QUICK, "search": search, "finetune_epochs": 0, "onnx": False, "latency_check": 0}
    first = run_pipeline(PipelineConfig(**{**base, "out_dir": str(tmp_path / "a")}), device="cpu")
    ckpt = str(tmp_path / "a" / "supernet" / "last.safetensors")
    one = run_pipeline(PipelineConfig(**{**base, "checkpoint": ckpt, "out_dir": str(tmp_path / "one")}))
    two = {**base, "checkpoint": ckpt, "out_dir": str(tmp_path / "two")}
    mp.start_processes(_pipeline_rank, args=(2, _free_port(), two), nprocs=2, start_method="spawn")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["best"]["arch"] == one["best"]["arch"] == first["best"]["arch"]
    for name in ("evolution", "random"):
        rows = []
        for d in ("one", "two"):
            lines = (tmp_path / d / "search" / name / "candidates.jsonl").read_text().splitlines()
            rows.append([(r["key"], r["top1"], r["loss"]) for r in map(json.loads, lines)])
        assert rows[0] == rows[1] and len(rows[0]) > 6
        assert summary["strategies"][name] == one["strategies"][name]
    assert (tmp_path / "two" / "export" / "model.safetensors").is_file()
