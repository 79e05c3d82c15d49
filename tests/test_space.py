from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vitnas.space import ArchConfig, SearchSpace

PRESETS = ["autoformer-tiny", "autoformer-small", "autoformer-base", "cifar"]


def test_arch_is_frozen_hashable_and_round_trips(tmp_path):
    arch = ArchConfig(192, 3, [3.5, 4, 3.5], [3, 4, 3])
    assert arch.mlp_ratios == (3.5, 4.0, 3.5) and arch.num_heads == (3, 4, 3)
    with pytest.raises(AttributeError):
        arch.depth = 4  # type: ignore[misc]
    same = ArchConfig(192, 3, (3.5, 4.0, 3.5), (3, 4, 3))
    assert arch == same and hash(arch) == hash(same) and arch.key() == same.key()
    assert len({arch, same, ArchConfig(192, 3, (3.5, 4.0, 4.0), (3, 4, 3))}) == 2
    assert ArchConfig.from_json(arch.to_json()) == arch
    path = tmp_path / "arch.yaml"
    arch.to_yaml(path)
    assert ArchConfig.from_yaml(path) == arch
    assert arch.hidden_dims() == (672, 768, 672)


def test_arch_rejects_bad_values():
    with pytest.raises(ValueError, match="mlp_ratios has 2 entries, expected depth=3"):
        ArchConfig(192, 3, (4.0, 4.0), (3, 3, 3))
    with pytest.raises(ValueError, match="num_heads"):
        ArchConfig(192, 2, (4.0, 4.0), (3, 3.5))
    with pytest.raises(ValueError, match="unknown key 'heads'"):
        ArchConfig.from_dict({"embed_dim": 1, "depth": 1, "mlp_ratios": [1], "heads": [1]})
    with pytest.raises(ValueError, match="missing key 'num_heads'"):
        ArchConfig.from_dict({"embed_dim": 1, "depth": 1, "mlp_ratios": [1]})


def test_presets_are_the_reference_spaces():
    tiny = SearchSpace.preset("autoformer-tiny")
    assert (tiny.embed_dim, tiny.depth, tiny.mlp_ratio, tiny.num_heads) == (
        (192, 216, 240),
        (12, 13, 14),
        (3.5, 4.0),
        (3, 4),
    )
    assert (tiny.max_embed_dim, tiny.max_num_heads, tiny.max_mlp_ratio, tiny.max_depth) == (256, 4, 4.0, 14)
    small = SearchSpace.preset("autoformer-small")
    assert (small.embed_dim, small.mlp_ratio, small.num_heads) == ((320, 384, 448), (3.0, 3.5, 4.0), (5, 6, 7))
    assert (small.max_embed_dim, small.max_num_heads, small.max_depth) == (448, 7, 14)
    base = SearchSpace.preset("autoformer-base")
    assert (base.embed_dim, base.depth, base.num_heads) == ((528, 576, 624), (14, 15, 16), (9, 10))
    assert (base.max_embed_dim, base.max_num_heads, base.max_depth) == (640, 10, 16)
    with pytest.raises(ValueError, match="unknown search space preset 'huge'"):
        SearchSpace.preset("huge")


@pytest.mark.parametrize("name", PRESETS)
def test_sampling_is_seeded_and_stays_in_space(name):
    space = SearchSpace.preset(name)
    a = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(200)]
    assert all(space.contains(x) for x in archs)
    assert len({x.key() for x in archs}) > 150  # the spaces are large: almost no repeats
    assert {x.depth for x in archs} == set(space.depth)
    for x, y in zip(archs[:-1], archs[1:]):
        child = space.mutate(x, rng)
        assert space.contains(child)
        cross = space.crossover(x, y, rng)
        assert space.contains(cross) and cross.depth in (x.depth, y.depth)
    assert space.contains(space.smallest()) and space.contains(space.largest())


def test_mutation_and_crossover_semantics():
    space = SearchSpace.preset("autoformer-tiny")
    rng = np.random.default_rng(1)
    arch = space.sample(rng)
    assert space.mutate(arch, rng, layer_prob=0, depth_prob=0, embed_prob=0) == arch
    changed = [space.mutate(arch, rng, layer_prob=1.0, depth_prob=0, embed_prob=0) for _ in range(20)]
    assert all(c.depth == arch.depth and c.embed_dim == arch.embed_dim for c in changed)
    assert any(c != arch for c in changed)
    deeper = ArchConfig(192, 14, (3.5,) * 14, (3,) * 14)
    shallow = space.mutate(deeper, np.random.default_rng(3), layer_prob=0, depth_prob=1.0, embed_prob=0)
    assert shallow.mlp_ratios == deeper.mlp_ratios[: shallow.depth]  # shrinking keeps the leading layers
    a = ArchConfig(192, 12, (3.5,) * 12, (3,) * 12)
    b = ArchConfig(240, 12, (4.0,) * 12, (4,) * 12)
    kids = [space.crossover(a, b, rng) for _ in range(50)]
    assert {k.embed_dim for k in kids} == {192, 240}
    assert any(3.5 in k.mlp_ratios and 4.0 in k.mlp_ratios for k in kids)


def test_size_extremes_and_validation():
    space = SearchSpace.preset("autoformer-tiny")
    assert space.size() == 3 * sum(4**d for d in (12, 13, 14))
    assert space.smallest() == ArchConfig(192, 12, (3.5,) * 12, (3,) * 12)
    assert space.largest() == ArchConfig(240, 14, (4.0,) * 14, (4,) * 14)
    bad = ArchConfig(200, 12, (3.5,) * 12, (3,) * 11 + (5,))
    assert not space.contains(bad) and bad not in space
    with pytest.raises(ValueError, match=r"embed_dim=200 is not one of the allowed choices \[192, 216, 240\]"):
        space.check_arch(bad)
    problems = space.violations(bad)
    assert any("num_heads[11]=5" in p and "[3, 4]" in p for p in problems)
    with pytest.raises(ValueError, match="max_embed_dim=100 is smaller"):
        SearchSpace((128,), (2,), (4.0,), (2,), max_embed_dim=100)


AUTOFORMER_T = """\
SUPERNET:
  MLP_RATIO: 4.0
  NUM_HEADS: 4
  EMBED_DIM: 256
  DEPTH: 14
SEARCH_SPACE:
  MLP_RATIO:
    - 3.5
    - 4
  NUM_HEADS:
    - 3
    - 4
  DEPTH:
    - 12
    - 13
    - 14
  EMBED_DIM:
    - 192
    - 216
    - 240
RETRAIN:
  MLP_RATIO: [3.5, 3.5, 3.0, 3.5, 3.0, 3.0, 4.0, 4.0, 3.5, 4.0, 3.5, 4.0, 3.5]
  NUM_HEADS: [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 3, 3]
  DEPTH: 13
  EMBED_DIM: 192
"""


def test_reads_autoformer_yaml(tmp_path):
    path = tmp_path / "AutoFormer-T.yaml"
    path.write_text(AUTOFORMER_T)
    space = SearchSpace.from_yaml(path)
    tiny = SearchSpace.preset("autoformer-tiny")
    assert space.with_(name=tiny.name) == tiny
    arch = ArchConfig.from_yaml(path)
    assert arch.depth == 13 and arch.embed_dim == 192 and arch.num_heads[10] == 4
    assert arch.mlp_ratios[2] == 3.0  # outside the tiny space, as in the reference config
    assert not space.contains(arch)


def test_yaml_errors_name_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(AUTOFORMER_T.replace("  DEPTH: 14\n", "  DEPTH: 14\n  DEPHT: 3\n", 1))
    with pytest.raises(ValueError, match=r"bad.yaml: SUPERNET: unknown key 'DEPHT'"):
        SearchSpace.from_yaml(path)
    path.write_text(AUTOFORMER_T.replace("  NUM_HEADS: 4\n", "", 1))
    with pytest.raises(ValueError, match=r"bad.yaml: SUPERNET: missing key 'NUM_HEADS'"):
        SearchSpace.from_yaml(path)
    path.write_text("embed_dim: [64]\ndepth: [2]\nmlp_ratio: [2]\nnum_heads: [2]\nwidth: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key 'width'"):
        SearchSpace.from_yaml(path)
    path.write_text("embed_dim: [64]\ndepth: [2]\nmlp_ratio: [2]\n")
    with pytest.raises(ValueError, match=r"bad.yaml: missing key 'num_heads'"):
        SearchSpace.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        SearchSpace.from_yaml(tmp_path / "nope.yaml")


def test_our_space_yaml_round_trips(tmp_path):
    space = SearchSpace.preset("cifar")
    path = tmp_path / "space.yaml"
    space.to_yaml(path)
    assert SearchSpace.from_yaml(path) == space


def test_space_does_not_import_torch():
    code = textwrap.dedent("""
        import sys, numpy as np
        import vitnas.space, vitnas.costs.vit
        from vitnas import ArchConfig, SearchSpace
        SearchSpace.preset('cifar').sample(np.random.default_rng(0))
        assert 'torch' not in sys.modules, 'vitnas.space imported torch'
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_space_yaml_example_loads_and_builds(tmp_path):
    """The README's search-space example is a working space: it loads, has the size it says and runs."""
    import re
    from pathlib import Path

    import torch

    from vitnas import ViTSupernet

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### Your own search space.*?```yaml\n(.*?)```", readme, re.S)
    assert block, "README lost its search-space YAML example"
    (tmp_path / "my-space.yaml").write_text(block.group(1))
    space = SearchSpace.from_yaml(tmp_path / "my-space.yaml")
    assert space.name == "my-space" and space.size() == 4032 and "4,032 archs" in block.group(1)
    assert space.max_embed_dim == 128 and space.max_depth == 5  # max_* default to the largest choices
    net = ViTSupernet(space, num_classes=10).eval()
    with torch.no_grad(), net.active(space.sample(np.random.default_rng(0))):
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
