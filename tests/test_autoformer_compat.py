"""Loading AutoFormer's own checkpoints.

The reference semantics are re-stated here, independently of vitnas's code, as a slow per-pair
forward over a state dict with the reference's key names and layouts (from microsoft/Cream,
AutoFormer/model/: interleaved q/k/v rows with a plain bias prefix, per-pair relative-position
embeddings, head dim fixed at 64). Checkpoints written by the real reference code can be checked too:
point VITNAS_AUTOFORMER_FIXTURES at a folder of `<name>.pth` + `<name>_logits.pt` pairs.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitnas import ArchConfig, SearchSpace, load_autoformer

HD = 64  # the reference hard-codes 64 as the q/k/v head dim under --change_qkv


def make_reference_state(E=128, H=2, depth=4, mlp=4.0, img=32, patch=4, classes=10, M=14, seed=0):
    """A supernet state dict with the reference's keys and shapes, filled with non-trivial values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.3, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    P = (img // patch) ** 2
    Fh = int(E * mlp)
    sd = {
        "pos_embed": rnd(1, P + 1, E, std=0.5),
        "cls_token": rnd(1, 1, E, std=0.5),
        "patch_embed_super.proj.weight": rnd(E, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
        "patch_embed_super.proj.bias": rnd(E, std=0.1),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "attn.qkv.weight": rnd(3 * E, E, std=E**-0.5),
                b + "attn.qkv.bias": rnd(3 * E, std=0.1),
                b + "attn.rel_pos_embed_k.embeddings_table_v": rnd(2 * M + 2, E // H),
                b + "attn.rel_pos_embed_k.embeddings_table_h": rnd(2 * M + 2, E // H),
                b + "attn.rel_pos_embed_v.embeddings_table_v": rnd(2 * M + 2, E // H),
                b + "attn.rel_pos_embed_v.embeddings_table_h": rnd(2 * M + 2, E // H),
                b + "attn.proj.weight": rnd(E, E, std=E**-0.5),
                b + "attn.proj.bias": rnd(E, std=0.1),
                b + "attn_layer_norm.weight": rnd(E, std=0.2, mean=1.0),
                b + "attn_layer_norm.bias": rnd(E, std=0.1),
                b + "ffn_layer_norm.weight": rnd(E, std=0.2, mean=1.0),
                b + "ffn_layer_norm.bias": rnd(E, std=0.1),
                b + "fc1.weight": rnd(Fh, E, std=E**-0.5),
                b + "fc1.bias": rnd(Fh, std=0.1),
                b + "fc2.weight": rnd(E, Fh, std=Fh**-0.5),
                b + "fc2.bias": rnd(E, std=0.1),
            }
        )
    sd.update(
        {
            "norm.weight": rnd(E, std=0.2, mean=1.0),
            "norm.bias": rnd(E, std=0.1),
            "head.weight": rnd(classes, E, std=E**-0.5),
            "head.bias": rnd(classes, std=0.1),
        }
    )
    return sd


def reference_forward(sd, arch: ArchConfig, x, patch, M):
    """AutoFormer's eval forward for one subnet, pair by pair (slow, for tests only)."""
    E = arch.embed_dim
    w = sd["patch_embed_super.proj.weight"][:E]
    t = F.conv2d(x, w, sd["patch_embed_super.proj.bias"][:E], stride=patch).flatten(2).transpose(1, 2)
    B, P, _ = t.shape
    t = torch.cat([sd["cls_token"][..., :E].expand(B, -1, -1), t], 1) + sd["pos_embed"][..., :E]
    N = P + 1
    side = int(P**0.5)
    # per-pair bucket ids, class token padded with 0
    a = torch.arange(P)
    iv = ((a[None, :] // side) - (a[:, None] // side)).clamp(-M, M) + M + 1
    ih = ((a[None, :] % side) - (a[:, None] % side)).clamp(-M, M) + M + 1
    iv, ih = F.pad(iv, (1, 0, 1, 0)), F.pad(ih, (1, 0, 1, 0))
    for i, (h, r) in enumerate(zip(arch.num_heads, arch.mlp_ratios)):
        b = f"blocks.{i}."
        Q = h * HD
        y = F.layer_norm(t, (E,), sd[b + "attn_layer_norm.weight"][:E], sd[b + "attn_layer_norm.bias"][:E], 1e-5)
        W = sd[b + "attn.qkv.weight"][:, :E]
        rows = [j for part in range(3) for j in range(part, 3 * Q, 3)]  # rows 0,3,6..., then 1,4,..., then 2,5,...
        qkv = y @ W[rows].t() + sd[b + "attn.qkv.bias"][: 3 * Q]
        q, k, v = qkv.reshape(B, N, 3, h, HD).permute(2, 0, 3, 1, 4)
        Rk = (
            sd[b + "attn.rel_pos_embed_k.embeddings_table_v"][:, :HD][iv]
            + sd[b + "attn.rel_pos_embed_k.embeddings_table_h"][:, :HD][ih]
        )
        Rv = (
            sd[b + "attn.rel_pos_embed_v.embeddings_table_v"][:, :HD][iv]
            + sd[b + "attn.rel_pos_embed_v.embeddings_table_h"][:, :HD][ih]
        )
        s = HD**-0.5
        logits = (q @ k.transpose(-1, -2)) * s + torch.einsum("bhid,ijd->bhij", q, Rk) * s
        att = logits.softmax(-1)
        o = att @ v + torch.einsum("bhij,ijd->bhid", att, Rv)
        o = o.transpose(1, 2).reshape(B, N, Q)
        t = t + o @ sd[b + "attn.proj.weight"][:E, :Q].t() + sd[b + "attn.proj.bias"][:E]
        y = F.layer_norm(t, (E,), sd[b + "ffn_layer_norm.weight"][:E], sd[b + "ffn_layer_norm.bias"][:E], 1e-5)
        Fh = int(E * r)
        y = F.gelu(y @ sd[b + "fc1.weight"][:Fh, :E].t() + sd[b + "fc1.bias"][:Fh])
        t = t + y @ sd[b + "fc2.weight"][:E, :Fh].t() + sd[b + "fc2.bias"][:E]
    t = F.layer_norm(t, (E,), sd["norm.weight"][:E], sd["norm.bias"][:E], 1e-5)
    return t[:, 1:].mean(1) @ sd["head.weight"][:, :E].t() + sd["head.bias"]


def save_reference_checkpoint(path: Path, sd: dict, **args) -> None:
    """As the reference's supernet_train.py saves it (an argparse.Namespace pickled beside the weights)."""
    namespace = argparse.Namespace(
        gp=True,
        change_qkv=True,
        relative_position=True,
        no_abs_pos=False,
        max_relative_position=14,
        input_size=32,
        patch_size=4,
        drop=0.0,
        drop_path=0.1,
        lr=1e-3,
        opt_betas=None,
        mode="super",
        **args,
    )
    torch.save(
        {
            "model": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6, "weight_decay": 0.05}]},
            "lr_scheduler": {"t_initial": 500, "base_values": [1e-3]},
            "epoch": 3,
            "scaler": {},
            "args": namespace,
        },
        path,
    )


SMALL = SearchSpace((96, 112, 128), (2, 3, 4), (3.0, 3.5, 4.0), (1, 2), img_size=32, patch_size=4, name="small")


@pytest.mark.parametrize("M", [14, 3])  # 3 < grid side 8: distances are clipped
def test_loaded_supernet_gives_reference_logits(tmp_path, M):
    sd = make_reference_state(M=M)
    path = tmp_path / "checkpoint.pth"
    save_reference_checkpoint(path, sd)
    net = load_autoformer(path, SMALL)
    assert net.qkv_layout == "autoformer" and not net.training
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    archs = [SMALL.sample(rng) for _ in range(6)] + [SMALL.largest(), SMALL.smallest()]
    for arch in archs:
        want = reference_forward(sd, arch, x, patch=4, M=M)
        with torch.no_grad(), net.active(arch):
            got = net(x)
            extracted = net.extract(arch)(x)
        assert (got - want).abs().max() <= 1e-4, arch
        assert (extracted - want).abs().max() <= 1e-4, arch


def test_ddp_prefix_and_bare_state_dicts_load(tmp_path):
    sd = make_reference_state(depth=2)
    space = SMALL.with_(depth=(1, 2), max_depth=2)
    path = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    net = load_autoformer(path, space)
    arch = space.largest()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), net.active(arch):
        torch.testing.assert_close(net(x), reference_forward(sd, arch, x, 4, 14), atol=1e-4, rtol=0)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": make_reference_state(depth=2), "args": Exploit()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        load_autoformer(path, SMALL)
    assert not (tmp_path / "pwned").exists()


def test_clear_errors(tmp_path):
    sd = make_reference_state(depth=2)
    path = tmp_path / "c.pth"
    save_reference_checkpoint(path, {**sd, "blocks.0.attn.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected key 'blocks.0.attn.extra'"):
        load_autoformer(path, SMALL)
    save_reference_checkpoint(path, sd)
    with pytest.raises(ValueError, match="max_depth=2, the space 'small' 4"):
        load_autoformer(path, SMALL)
    with pytest.raises(ValueError, match="max_embed_dim=128, the space 'autoformer-tiny' 256"):
        load_autoformer(path, "autoformer-tiny")
    path_v1 = tmp_path / "v1.pth"
    torch.save({"model": sd, "args": argparse.Namespace(change_qkv=False)}, path_v1)
    with pytest.raises(ValueError, match="without --change_qkv"):
        load_autoformer(path_v1, SMALL.with_(depth=(1, 2), max_depth=2))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_autoformer(tmp_path / "missing.pth", SMALL)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_autoformer(tmp_path / "junk.pth", SMALL)


FIXTURES = os.environ.get("VITNAS_AUTOFORMER_FIXTURES")


@pytest.mark.skipif(not FIXTURES, reason="set VITNAS_AUTOFORMER_FIXTURES to check files made by the reference code")
def test_checkpoints_written_by_the_reference_code():
    for logits_file in sorted(Path(FIXTURES).glob("*_logits.pt")):
        fx = torch.load(logits_file, weights_only=True)
        ckpt = logits_file.with_name(logits_file.name.replace("_logits.pt", ".pth"))
        c = fx["choices"]
        kw = fx["model_kwargs"]
        space = SearchSpace(
            c["embed_dim"],
            c["depth"],
            c["mlp_ratio"],
            c["num_heads"],
            max_embed_dim=kw["embed_dim"],
            max_depth=kw["depth"],
            max_num_heads=kw["num_heads"],
            max_mlp_ratio=kw["mlp_ratio"],
            img_size=kw["img_size"],
            patch_size=kw["patch_size"],
        )
        net = load_autoformer(ckpt, space)
        for cfg, want, params in zip(fx["configs"], fx["logits"], fx["params"]):
            arch = ArchConfig(cfg["embed_dim"][0], cfg["layer_num"], cfg["mlp_ratio"], cfg["num_heads"])
            with torch.no_grad(), net.active(arch):
                got = net(fx["images"])
            assert (got - want).abs().max() <= 1e-4, (ckpt.name, arch)
            assert net.num_params(arch) == params
            assert math.isfinite(float(got.sum()))
