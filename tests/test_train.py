from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import vitnas
from vitnas import ArchConfig, SearchSpace
from vitnas.cli import main as cli_main
from vitnas.train import TrainConfig, Trainer, TrainingDiverged, load_model, read_checkpoint
from vitnas.train.tasks import sample_step_archs
from vitnas.train.trainer import lr_at

TINY = dict(
    space="cifar",
    recipe="digits",
    batch_size=32,
    val_per_class=20,
    epochs=2,
    lr=4e-3,
    warmup_epochs=0.5,
    ckpt_every=4,
    log_every=2,
    threads=1,
    deterministic=True,
)


def ckpt_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["vitnas"])["step"]
    except Exception:
        return None


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitnas.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


CDARTS_TINY = {
    "space": "darts-tiny",
    "optimizer": "sgd",
    "lr": 0.4,
    "darts": {"pretrain_epochs": 0, "eval_warmup_epochs": 1, "cycle_epochs": 1},
}


@pytest.mark.parametrize("method", ["supernet", "cream", "cdarts"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, method):
    """Cream: the board fills and the meta network is updated (every 3 steps) in the second epoch, where the
    run is killed; the resumed run ends with the same board, meta network, weights and optimizers. CDARTS:
    killed in its first search epoch; α, both networks and all three optimizers end the same."""
    cfg = tmp_path / "tiny.yaml"
    extra = {"cream": {"start_epoch": 1, "meta_every": 3, "board_size": 3}} if method == "cream" else {}
    extra = CDARTS_TINY if method == "cdarts" else extra
    cfg.write_text(yaml.safe_dump({**TINY, **extra}))
    full = run_cli(["train-supernet", "--method", method, "--config", str(cfg), "--out-dir", "full"], tmp_path)
    assert full.returncode == 0, full.stderr
    total = ckpt_step(tmp_path / "full" / "last.safetensors")
    steps_per_epoch = total // 2

    proc = subprocess.Popen(
        [sys.executable, "-m", "vitnas.cli", "train-supernet", "--method", method, "--config", str(cfg)]
        + ["--out-dir", "killed"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    target = steps_per_epoch + 8  # mid-way through the second epoch
    deadline = time.time() + 300
    while time.time() < deadline:
        step = ckpt_step(tmp_path / "killed" / "last.safetensors")
        if step is not None and step >= target:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt_step(tmp_path / "killed" / "last.safetensors")
    assert killed_at is not None and steps_per_epoch < killed_at < total and killed_at % steps_per_epoch
    resumed = run_cli(
        ["train-supernet", "--method", method, "--config", str(cfg), "--out-dir", "killed", "--resume"], tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    a, meta_a = read_checkpoint(tmp_path / "full" / "last.safetensors")
    b, meta_b = read_checkpoint(tmp_path / "killed" / "last.safetensors")
    assert meta_b["step"] == total
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    extra_optimizers = {"cream": ("optim_meta",), "cdarts": ("optim_alpha", "optim_eval")}.get(method, ())
    for group in ("optim", "task") + extra_optimizers:
        assert a[group].keys() == b[group].keys()
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), (group, key)
    assert meta_a["history"] == meta_b["history"]
    if method == "cream":
        assert a["task"] and meta_a["cream"] == meta_b["cream"] and meta_a["cream"]["meta_updates"] > 0
        assert len(meta_a["cream"]["board"]) == 3
    if method == "cdarts":
        assert meta_a["darts"] == meta_b["darts"] and len(meta_a["darts"]["history"]) == 2
    rows = (tmp_path / "killed" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(2, total + 1, 2))  # no duplicated log rows


DDP_SCRIPT = """
import json, sys, torch
from safetensors.torch import save_file
from vitnas.train import Trainer, TrainConfig
out = sys.argv[1]
cfg = TrainConfig(space="cifar", recipe="digits", batch_size=16, val_per_class=20, epochs=1, lr=4e-3,
                  ckpt_every=1000, log_every=1, threads=1, out_dir=out, sampling="{sampling}", max_steps=6)
archs = []
trainer = Trainer(cfg, progress=lambda info: archs.append([a.key() for a in info.archs]))
trainer.fit()
rank = trainer.dist.rank
json.dump(archs, open(f"{{out}}/archs{{rank}}.json", "w"))
save_file({{k: v.contiguous() for k, v in trainer.model.state_dict().items()}}, f"{{out}}/rank{{rank}}.safetensors")
"""


@pytest.mark.parametrize("sampling", ["uniform", "sandwich"])
def test_torchrun_two_ranks_share_archs_and_weights(tmp_path, sampling):
    from safetensors.torch import load_file

    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(sampling=sampling)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a0 = json.loads((tmp_path / "archs0.json").read_text())
    a1 = json.loads((tmp_path / "archs1.json").read_text())
    assert len(a0) == 6 and a0 == a1
    assert len({tuple(x) for x in a0}) > 1  # the arch changes from step to step
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    init = Trainer(TrainConfig(space="cifar", recipe="digits", val_per_class=20, out_dir=str(tmp_path / "x")))
    moved = 0
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
        moved += not torch.equal(w0[k], init.model.state_dict()[k])
    assert moved > 0.9 * len(w0)  # the ranks trained, identically


def test_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key 'learning_rate'"):
        TrainConfig.from_yaml(path)
    assert cli_main(["train-supernet", "--config", str(path)]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="sampling='sandwitch'"):
        TrainConfig(sampling="sandwitch")
    with pytest.raises(ValueError, match="task 'subnet' needs exactly one of arch"):
        TrainConfig(task="subnet")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = TrainConfig(**{**TINY, "epochs": 1}, out_dir=str(tmp_path))
    trainer = Trainer(cfg)
    original = trainer.task.loss

    def poisoned(batch):
        result = original(batch)
        if batch.step == 9:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(trainer.task, "loss", poisoned)
    before = None
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 9 .*last good checkpoint is"):
        trainer.fit()
    groups, meta = read_checkpoint(tmp_path / "last.safetensors")
    assert meta["step"] == 8
    before = groups["model"]
    assert all(torch.isfinite(v).all() for v in before.values())


def test_sandwich_rule_archs_and_lr_schedule():
    space = SearchSpace.preset("cifar")
    cfg = TrainConfig(sampling="sandwich", sandwich_random=2)
    archs = sample_step_archs(space, cfg, 5)
    assert archs[:2] == [space.largest(), space.smallest()] and len(archs) == 4
    assert archs == sample_step_archs(space, cfg, 5) and archs != sample_step_archs(space, cfg, 6)
    uni = TrainConfig()
    assert sample_step_archs(space, uni, 3) == sample_step_archs(space, uni, 3)
    assert lr_at(0, 100, 10, 1.0, 0.0, 0.0) == 0.0 and lr_at(10, 100, 10, 1.0, 0.0, 0.0) == 1.0
    assert lr_at(100, 100, 10, 1.0, 0.01, 0.0) == pytest.approx(0.01)


def test_retrain_inherits_supernet_weights(tmp_path):
    sup = Trainer(TrainConfig(**{**TINY, "epochs": 1, "max_steps": 3}, out_dir=str(tmp_path / "sup")))
    sup.fit()
    arch = ArchConfig(128, 5, (3.0,) * 5, (3,) * 5)
    arch.to_yaml(tmp_path / "arch.yaml")
    sub = Trainer(
        TrainConfig(
            **{**TINY, "epochs": 1, "max_steps": 2},
            task="subnet",
            arch=str(tmp_path / "arch.yaml"),
            init_from=str(tmp_path / "sup" / "last.safetensors"),
            out_dir=str(tmp_path / "sub"),
        )
    )
    supernet, _ = load_model(tmp_path / "sup" / "last.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), supernet.active(arch):
        want = supernet(x)
    sub.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(sub.model(x), want, atol=1e-5, rtol=0)
    result = sub.fit()
    model, meta = load_model(result["checkpoint"])
    assert meta["arch"] == arch.to_dict() and model.arch == arch


def test_cli_retrain_and_evaluate(tmp_path, capsys):
    arch = ArchConfig(96, 4, (2.0,) * 4, (2,) * 4)
    arch.to_yaml(tmp_path / "a.yaml")
    rc = cli_main(
        [
            "retrain",
            "--arch",
            str(tmp_path / "a.yaml"),
            "--recipe",
            "digits",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--val-per-class",
            "20",
            "--out-dir",
            str(tmp_path / "r"),
            "--threads",
            "1",
            "--augment",
            "crop_scale=[0.9, 1.0]",
            "--ema-decay",
            "0.9",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "final: epoch 1" in out
    assert cli_main(["evaluate", str(tmp_path / "r" / "last.safetensors"), "--split", "test", "--ema"]) == 0
    out = capsys.readouterr().out
    assert "test split of digits" in out and "359" in out
    assert (tmp_path / "r" / "metrics.csv").is_file() and any((tmp_path / "r" / "tb").iterdir())


def test_runs_never_overwrite_and_resume_checks_settings(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 1, "max_steps": 2}, out_dir=str(tmp_path))
    first = Trainer(cfg)
    first.fit()
    with pytest.raises(ValueError, match="last.safetensors exists: pass --resume"):
        Trainer(cfg).fit()
    changed = TrainConfig(**{**TINY, "epochs": 1, "max_steps": 2, "lr": 1e-3}, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"written by a run with lr=0.004; this run has lr=0.001"):
        Trainer(changed, resume=True).fit()


def test_fine_tune_must_share_the_supernet_split(tmp_path):
    sup = Trainer(TrainConfig(**{**TINY, "epochs": 1, "max_steps": 1}, out_dir=str(tmp_path / "sup")))
    sup.fit()
    ArchConfig(96, 4, (2.0,) * 4, (2,) * 4).to_yaml(tmp_path / "a.yaml")
    cfg = TrainConfig(
        **{**TINY, "seed": 1},
        task="subnet",
        arch=str(tmp_path / "a.yaml"),
        init_from=str(tmp_path / "sup" / "last.safetensors"),
        out_dir=str(tmp_path / "sub"),
    )
    with pytest.raises(ValueError, match=r"trained with seed=0, this run has seed=1"):
        Trainer(cfg)


def test_yaml_numbers_without_a_dot(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-4\nepochs: 3\nclip_grad: null\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.lr == 5e-4 and isinstance(cfg.lr, float) and cfg.clip_grad is None
    path.write_text("lr: fast\n")
    with pytest.raises(ValueError, match=r"c.yaml: lr must be float, got 'fast'"):
        TrainConfig.from_yaml(path)


def test_retrain_a_registered_model_then_evaluate_and_export(tmp_path, capsys):
    """`vitnas retrain --model NAME` trains any registry model; its checkpoint evaluates, resumes and exports."""
    from vitnas.export import load_subnet

    out = tmp_path / "m0"
    args = ["retrain", "--model", "efficientvit_m0", "--img-size", "32", "--recipe", "digits", "--epochs", "3"]
    args += ["--batch-size", "64", "--lr", "8e-3", "--warmup-epochs", "0.5", "--val-per-class", "20"]
    args += ["--threads", "2", "--out-dir", str(out)]
    assert cli_main(args) == 0
    model, meta = load_model(out / "last.safetensors")
    assert meta["model"] == {
        "kind": "registry",
        "name": "efficientvit_m0",
        "kwargs": {"img_size": 32, "num_classes": 10, "drop_path_rate": 0.1},
    }
    assert meta["history"][-1]["val_top1"] > 80.0  # chance is 10%
    capsys.readouterr()
    assert cli_main(args + ["--resume"]) == 0  # finished: resumes at the last step and stops
    assert cli_main(["evaluate", str(out / "last.safetensors"), "--split", "test"]) == 0
    assert "efficientvit_m0" in capsys.readouterr().out
    assert cli_main(["export", str(out / "last.safetensors"), "--out", str(tmp_path / "exp"), "--onnx"]) == 0
    loaded = load_subnet(tmp_path / "exp")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert (tmp_path / "exp" / "model.onnx").is_file() and not (tmp_path / "exp" / "arch.yaml").exists()
    # the training checkpoint and the exported folder both serve as pretrained weights
    from vitnas.models import load_weights, read_state_dict

    weights = read_state_dict(out / "last.safetensors")
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    fresh = vitnas.create_model("efficientvit_m0", num_classes=10, img_size=32).eval()
    assert load_weights(fresh, tmp_path / "exp")["skipped"] == []
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--model", "efficientvit_m0", "--arch", "a.yaml"], "exactly one of arch"),
        (["--model", "efficientvit_m0", "--init-from", "s.safetensors"], "init_from inherits supernet weights"),
        (["--model", "deit_huge"], "unknown model 'deit_huge'"),
    ],
)
def test_retrain_model_errors(tmp_path, capsys, extra, match):
    assert cli_main(["retrain", "--out-dir", str(tmp_path), *extra]) == 2
    assert match in capsys.readouterr().err


def test_retrain_starts_from_pretrained_weights(tmp_path):
    torch.manual_seed(1)
    src = vitnas.create_model("efficientvit_m0", num_classes=1000, img_size=32)
    torch.save({"model": src.state_dict()}, tmp_path / "ref.pth")
    cfg = TrainConfig(
        **{**TINY, "epochs": 1},
        task="subnet",
        model="efficientvit_m0",
        img_size=32,
        pretrained=str(tmp_path / "ref.pth"),
        out_dir=str(tmp_path / "r"),
    )
    model = Trainer(cfg).model
    own = model.state_dict()
    same = [k for k, v in src.state_dict().items() if not k.startswith("head.l.")]
    assert all(torch.equal(own[k], src.state_dict()[k]) for k in same)
    assert own["head.l.weight"].shape == (10, 192)
    with pytest.raises(ValueError, match="pretrained='x.pth' and init_from both initialise the model"):
        TrainConfig(task="subnet", arch="a.yaml", pretrained="x.pth", init_from="s.safetensors")
