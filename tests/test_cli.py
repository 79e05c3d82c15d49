"""What a new user runs into at the command line: help texts, arch checks, broken files, log lines."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import onnx
import pytest
import torch

from vitnas import ArchConfig
from vitnas.cli import build_parser
from vitnas.cli import main as cli_main
from vitnas.train import TrainConfig, Trainer

TINY = dict(space="digits", recipe="digits", batch_size=64, val_per_class=20, threads=1)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_of_every_verb_has_help_text():
    verbs = _subparsers(build_parser())
    assert {"demo", "search", "export", "train-supernet", "retrain", "evaluate", "costs"} <= set(verbs)
    missing = [
        f"{verb} {a.option_strings or a.dest}"
        for verb, p in verbs.items()
        for a in p._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    assert not missing, missing
    retrain = {a.dest: a.help for a in verbs["retrain"]._actions}
    assert "global batch of 512" in retrain["lr"].lower() and "(default: 0.0005)" in retrain["lr"]
    assert "images per step" in retrain["batch_size"]


def _supernet(tmp_path):
    Trainer(TrainConfig(**TINY, epochs=1, max_steps=1, out_dir=str(tmp_path / "sup"))).fit()
    return tmp_path / "sup" / "last.safetensors"


def test_arch_outside_the_space_is_refused_everywhere(tmp_path, capsys):
    ckpt = _supernet(tmp_path)
    bad = tmp_path / "bad.yaml"
    ArchConfig(80, 3, (2.0,) * 3, (2,) * 3).to_yaml(bad)  # digits: embed_dim in 48 / 64 / 96
    want = "bad.yaml: arch outside search space 'digits': embed_dim=80 is not one of the allowed choices [48, 64, 96]"
    for args in (
        ["export", str(ckpt), "--arch", str(bad), "--out", str(tmp_path / "x")],
        ["evaluate", str(ckpt), "--arch", str(bad)],
        ["costs", str(bad), "--space", "digits"],
        [
            "retrain",
            "--arch",
            str(bad),
            "--init-from",
            str(ckpt),
            *sum([[f"--{k}".replace("_", "-"), str(v)] for k, v in TINY.items()], []),
            "--out-dir",
            str(tmp_path / "r"),
        ],
        ["retrain", "--arch", str(bad), "--space", "digits", "--out-dir", str(tmp_path / "r")],
    ):
        assert cli_main(args) == 2, args
        assert want in capsys.readouterr().err, args
    assert not (tmp_path / "x").exists() and not (tmp_path / "r").exists()


def test_truncated_checkpoint_says_so(tmp_path, capsys):
    ckpt = _supernet(tmp_path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert cli_main(["evaluate", str(cut)]) == 2
    err = capsys.readouterr().err
    assert f"{cut}: truncated or corrupt" in err and "not a complete safetensors file" in err
    from vitnas.models import read_state_dict

    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_state_dict(cut)


def test_epoch_log_line_does_not_repeat_itself_and_lr_rule_is_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vitnas"):
        Trainer(TrainConfig(**TINY, epochs=1, max_steps=2, out_dir=str(tmp_path))).fit()
    epoch = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert epoch == [epoch[0]] and epoch[0].startswith("epoch 0 (step 2): val_top1_largest ")
    assert "epoch 0" not in epoch[0].partition(":")[2] and "step" not in epoch[0].partition(":")[2]
    lr = [r.getMessage() for r in caplog.records if r.getMessage().startswith("peak lr")]
    assert lr == ["peak lr 6.25e-05 = lr 0.0005 x global batch 64 / 512 (lr is given for a batch of 512)"]


def test_keep_best_checkpoint_holds_the_best_evaluated_epoch(tmp_path):
    ArchConfig(48, 2, (2.0, 2.0), (2, 2)).to_yaml(tmp_path / "a.yaml")
    cfg = TrainConfig(
        **{**TINY, "recipe": "none"},
        task="subnet",
        arch=str(tmp_path / "a.yaml"),
        epochs=3,
        lr=0.05,
        out_dir=str(tmp_path / "r"),
    )
    trainer = Trainer(cfg)
    trainer.fit()
    from vitnas.checkpoint import read_metadata
    from vitnas.models.spec import load_model

    scores = [h["val_top1"] for h in trainer.history]
    top = max(range(3), key=lambda i: (scores[i], -i))  # the first epoch reaching the maximum
    best = read_metadata(tmp_path / "r" / "best.safetensors")
    assert best["best"] == {"metric": "val_top1", "value": scores[top], "epoch": top + 1, "step": best["step"]}
    assert best["step"] == trainer.history[top]["step"] and read_metadata(trainer.ckpt_path)["best"] == best["best"]
    model, _ = load_model(tmp_path / "r" / "best.safetensors")
    assert trainer._evaluate(model)["top1"] == scores[top]
    assert torch.is_tensor(next(model.parameters()))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "r" / "best.safetensors"), "pt") as f:  # weights to export, no optimizer
        assert "optimizer" not in best and not [k for k in f.keys() if not k.startswith(("model.", "ema."))]  # noqa: SIM118


def test_export_int8_onnx_reports_held_out_accuracy_of_both(tmp_path, capsys):
    ckpt = _supernet(tmp_path)
    arch = tmp_path / "arch.yaml"
    ArchConfig(48, 2, (2.0, 2.0), (2, 2)).to_yaml(arch)
    out = tmp_path / "exp"
    assert cli_main(["export", str(ckpt), "--arch", str(arch), "--out", str(out), "--int8"]) == 2
    assert "--int8 quantizes the ONNX model: pass --onnx too" in capsys.readouterr().err
    assert cli_main(["export", str(ckpt), "--arch", str(arch), "--out", str(out), "--onnx", "--int8"]) == 0
    assert "held-out top-1" in capsys.readouterr().out
    report = json.loads((out / "config.json").read_text())["onnx_int8"]
    assert report["mode"] == "static" and report["val_images"] == 200 and report["calibration_images"] == 256
    assert abs(report["top1_int8"] - report["top1_fp32"]) <= 5.0  # a barely trained net: close, not equal
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out / "model.int8.onnx").graph.node)
    assert session.run(None, {"images": np.zeros((3, 3, 16, 16), np.float32)})[0].shape == (3, 10)
    assert cli_main(["export", str(ckpt), "--arch", str(arch), "--out", str(tmp_path / "d"), "--onnx", "--int8",
                 "--int8-dynamic"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "d" / "config.json").read_text())["onnx_int8"]["mode"] == "dynamic"
