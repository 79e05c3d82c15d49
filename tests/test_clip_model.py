"""TinyCLIP's model side: CLIP's BPE tokenizer, the CLIP model in open_clip's layout (and TinyCLIP's), the
registered TinyCLIP configs, manual and automatic (hard-concrete mask) weight inheritance and pruning.

Expected token ids and reference features were produced once by open_clip's own code (its tokenizer and
`open_clip.model.CLIP`, run outside this repository) and are hard-coded here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitnas.data import tokenizer as tokenizer_module
from vitnas.data.tokenizer import ClipTokenizer, default_tokenizer, tokenize
from vitnas.models import create_model
from vitnas.models.clip import (
    CLIP,
    CLIPConfig,
    CLIPMasks,
    TowerMask,
    config_from_state_dict,
    convert_tinyclip_state_dict,
    load_clip_weights,
)
from vitnas.models.clip_inherit import (
    L0Masks,
    deterministic_mask,
    hard_concrete_sample,
    inherit_manual,
    prune,
    teacher_layer_map,
)
from vitnas.models.spec import build, spec_of

# -- tokenizer -------------------------------------------------------------------------------------
# open_clip.tokenizer.SimpleTokenizer().encode(text) (open_clip master; all but the HTML line also agree
# with instant-clip-tokenizer, which does no HTML unescaping)
OPEN_CLIP_IDS = {
    "a diagram": [320, 22697],
    "a dog": [320, 1929],
    "a cat": [320, 2368],
    "A photo of a DOG.": [320, 1125, 539, 320, 1929, 269],
    "  multiple   spaces\tand\nnewlines  ": [6470, 9006, 537, 1218, 3418],
    "it's a café — naïve résumé": [585, 568, 320, 15304, 2005, 1097, 35689, 563, 29106, 7054, 4166],
    "hello world! 123 4567": [3306, 1002, 256, 272, 273, 274, 275, 276, 277, 278],
    "&amp; html &lt;b&gt; entities": [261, 18231, 283, 321, 285, 38134],
    "emoji 😀 test": [16327, 7334, 1628],
    "你好世界": [47466, 254, 29290, 121, 19759, 244, 163, 243, 490],
    "TinyCLIP: cross-modal distillation via affinity mimicking": [
        21716,
        9289,
        281,
        3417,
        268,
        33157,
        41586,
        656,
        1048,
        41451,
        47116,
        674,
    ],  # fmt: skip
    "don't you'll we've I'm they'd": [847, 713, 592, 1342, 649, 1200, 328, 880, 889, 1896],
}


@pytest.mark.parametrize("text,ids", sorted(OPEN_CLIP_IDS.items()))
def test_tokenizer_ids_match_open_clip(text, ids):
    assert default_tokenizer().encode(text) == ids


def _open_clip_tokenizer_module():
    """open_clip's own tokenizer.py, loaded as a lone module (importing the open_clip package would need
    torchvision): the reference our ids are compared with."""
    import importlib.metadata
    import importlib.util

    try:
        files = importlib.metadata.files("open-clip-torch") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("open-clip-torch is not installed")
    path = next((f.locate() for f in files if str(f).replace("\\", "/") == "open_clip/tokenizer.py"), None)
    if path is None:
        pytest.skip("open-clip-torch has no open_clip/tokenizer.py")
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokenize_equals_open_clips_own_tokenizer_on_varied_text():
    reference = _open_clip_tokenizer_module()
    texts = [
        "a photo of a dog",
        "A Blurry PHOTO of the pickup_truck.",
        "it's a cat's toy; they'll've gone",
        "naïve café déjà vu — “quoted” text",
        "Fish &amp; chips &amp;amp; more",
        "numbers 12345 and 3.14159, emoji 🐶🚀",
        "日本語のテキスト and ελληνικά",
        "   spaces\tand\nnewlines   ",
        "mojibake: cafÃ©",
        "a very long caption " * 30,
        "",
    ]
    for length in (77, 16):
        assert torch.equal(tokenize(texts, length), reference.tokenize(texts, length)), length


def test_tokenize_pads_truncates_keeping_eot_and_decodes():
    tok = tokenize(["a diagram", "a dog"])
    assert tok.dtype == torch.long and tok.shape == (2, 77)
    assert tok[0, :5].tolist() == [49406, 320, 22697, 49407, 0] and tok[0, 4:].abs().sum() == 0
    assert tokenize("a dog")[0, :4].tolist() == [49406, 320, 1929, 49407]
    long = tokenize("word " * 100)[0]
    assert long[0] == 49406 and long[-1] == 49407 and long.argmax() == 76  # pooling finds the end token
    assert tokenize("a photo of a dog", context_length=5).tolist() == [[49406, 320, 1125, 539, 49407]]
    t = default_tokenizer()
    assert t.vocab_size == 49408 and (t.sot_id, t.eot_id) == (49406, 49407)
    assert t.decode(tokenize("A photo of a DOG.")[0]) == "a photo of a dog ."
    with pytest.raises(ValueError, match="at least 2"):
        tokenize("x", context_length=1)


def test_missing_vocabulary_names_the_package(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "VOCAB_DISTRIBUTIONS", ("no-such-distribution",))
    with pytest.raises(FileNotFoundError, match="open-clip-torch"):
        ClipTokenizer()


# -- model layout and outputs ----------------------------------------------------------------------
TINY_OPEN_CLIP = {  # open_clip model-config layout
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def filled(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Deterministic weights without an RNG: key i (sorted) gets 0.5 sin(0.731 j + i) over its flat index j,
    LayerNorm weights 1 + that."""
    out = {}
    for i, (k, shape) in enumerate(sorted(shapes.items())):
        v = 0.5 * torch.sin(torch.arange(math.prod(shape), dtype=torch.float64) * 0.731 + i)
        if ".ln" in "." + k and k.endswith(".weight"):
            v = v + 1
        out[k] = v.reshape(shape).float()
    return out


def fixed_images() -> torch.Tensor:
    return torch.cos(torch.arange(2 * 3 * 32 * 32, dtype=torch.float64) * 0.0123).reshape(2, 3, 32, 32).float()


# open_clip.model.CLIP(**TINY_OPEN_CLIP, quick_gelu=...) with `filled` weights: encode_image(fixed_images())
# [0, :4] and [1, -2:], encode_text(tokenize(["a diagram", "a photo of a dog"])) [0, :3] and [1, :3]
OPEN_CLIP_FEATURES = {
    False: ([-0.4719835, -0.5654261, -0.3699448, 0.0145727], [0.4515565, 0.5691711],
            [0.4879469, 0.2102315, -0.1749094], [0.4043725, 0.1859245, -0.1275281]),
    True: ([-0.4721679, -0.5657014, -0.3701698, 0.0145143], [0.4517274, 0.5694426],
           [0.4878563, 0.2103608, -0.1746257], [0.4041035, 0.1859003, -0.127296]),
}  # fmt: skip


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_state_dict_loads_strictly_and_gives_open_clip_features(quick_gelu):
    model = CLIP(CLIPConfig.from_dict({**TINY_OPEN_CLIP, "quick_gelu": quick_gelu})).eval()
    assert not list(model.buffers())  # open_clip's attn_mask is non-persistent: no key either way
    shapes = open_clip_shapes(TINY_OPEN_CLIP)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert load_clip_weights(model, filled(shapes))["loaded"] == len(shapes) == 62
    with torch.no_grad():
        img = model.encode_image(fixed_images())
        txt = model.encode_text(tokenize(["a diagram", "a photo of a dog"]))
    want = [torch.tensor(v) for v in OPEN_CLIP_FEATURES[quick_gelu]]
    got = [img[0, :4], img[1, -2:], txt[0, :3], txt[1, :3]]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=0)


def open_clip_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of open_clip's plain CLIP with a ViT image tower, written from its module layout."""
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    grid = v["image_size"] // v["patch_size"]
    shapes = {
        "visual.class_embedding": (v["width"],),
        "visual.positional_embedding": (grid * grid + 1, v["width"]),
        "visual.proj": (v["width"], e),
        "visual.conv1.weight": (v["width"], 3, v["patch_size"], v["patch_size"]),
        "token_embedding.weight": (t["vocab_size"], t["width"]),
        "positional_embedding": (t["context_length"], t["width"]),
        "text_projection": (t["width"], e),
        "logit_scale": (),
    }
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        w = t["width"] if ln == "ln_final" else v["width"]
        shapes.update({f"{ln}.weight": (w,), f"{ln}.bias": (w,)})
    for prefix, w, layers in (
        ("visual.transformer", v["width"], v["layers"]),
        ("transformer", t["width"], t["layers"]),
    ):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}."
            shapes.update(
                {p + "ln_1.weight": (w,), p + "ln_1.bias": (w,), p + "ln_2.weight": (w,), p + "ln_2.bias": (w,)}
            )
            shapes.update({p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,)})
            shapes.update({p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,)})
            shapes.update({p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,)})
            shapes.update({p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,)})
    return shapes


# TinyCLIP/src/open_clip/model_configs/TinyCLIP-ViT-39M-16-Text-19M.json
TINYCLIP_39M_JSON = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 512, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 6},
}


def test_full_tinyclip_config_has_open_clip_keys_and_shapes():
    with torch.device("meta"):
        registered = create_model("tinyclip_vit_39m_16_text_19m")
        from_json = CLIP(CLIPConfig.from_dict(TINYCLIP_39M_JSON))
    want = open_clip_shapes(TINYCLIP_39M_JSON)
    for model in (registered, from_json):
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    assert registered.config == from_json.config


def tinyclip_layout(sd: dict[str, torch.Tensor], ddp: bool) -> dict[str, torch.Tensor]:
    """`sd` as TinyCLIP's training saves it (`_image_encoder.visual.*`, `_text_encoder.*`, ...)."""
    inner = "module." if ddp else ""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            out[f"_image_encoder.{inner}{k}"] = v
        elif k == "logit_scale":
            out[f"_logit_scale.{inner}logit_scale"] = v
        else:
            out[f"_text_encoder.{inner}{k}"] = v
    return out


def test_tinyclip_checkpoint_layouts_load(tmp_path):
    torch.manual_seed(0)
    src = create_model("clip_tiny")
    sd = src.state_dict()
    ddp = tinyclip_layout(sd, ddp=True)
    ddp["_image_encoder.module.l0_module.lambda_1"] = torch.tensor(10.0)  # mask state: not weights
    assert convert_tinyclip_state_dict({"state_dict": ddp, "epoch": 3}).keys() == sd.keys()
    torch.save(
        {"epoch": 6, "state_dict": {f"module.{k}": v for k, v in tinyclip_layout(sd, False).items()}}, tmp_path / "t.pt"
    )
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "open_clip.safetensors")
    for path in (tmp_path / "t.pt", tmp_path / "open_clip.safetensors"):
        dst = create_model("clip_tiny")
        load_clip_weights(dst, path)
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="does not fit"):
        load_clip_weights(create_model("clip_tiny", text={"layers": 1}), sd)


# published image / text parameters in millions (REFERENCE-methods.md section 5; ViT-B/32: open_clip's
# 151.28M in all); the name's "Text-xM" leaves out the 49408 x width token embedding
PUBLISHED = {
    "tinyclip_vit_39m_16_text_19m": (38.6, 44.5, 39, 19),
    "tinyclip_vit_8m_16_text_3m": (8.3, 15.2, 8, 3),
    "tinyclip_vit_61m_32_text_29m": (61.4, 54.0, 61, 29),
    "tinyclip_vit_40m_32_text_19m": (39.7, 44.5, 40, 19),
    "clip_vit_b_32": (87.8, 63.4, 88, 38),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_registered_parameter_counts(name):
    image_m, text_m, image_name, text_name = PUBLISHED[name]
    with torch.device("meta"):
        model = create_model(name)
    image = sum(p.numel() for k, p in model.named_parameters() if k.startswith("visual."))
    text = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("visual.") and k != "logit_scale")
    assert round(image / 1e6, 1) == image_m and round(text / 1e6, 1) == text_m
    assert round(image / 1e6) == image_name
    assert round((text - model.token_embedding.weight.numel()) / 1e6) == text_name


def test_quick_gelu_and_option_checks():
    with torch.device("meta"):
        assert create_model("clip_vit_b_32_quickgelu").config.quick_gelu
        assert not create_model("clip_vit_b_32").config.quick_gelu
    with pytest.raises(ValueError, match="num_classes"):
        create_model("clip_tiny", num_classes=7)


# -- weight inheritance ----------------------------------------------------------------------------
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(3, 3, 32, 32), tokenize(["a dog", "a cat", "a photo of a diagram"])


def test_layer_map_follows_the_reference():
    assert teacher_layer_map(12, 6) == [0, 2, 4, 6, 8, 10]
    assert teacher_layer_map(12, 9) == list(range(9))  # T < 2S: the first layers (reference quirk)
    assert teacher_layer_map(9, 6) == list(range(6))
    assert teacher_layer_map(12, 12) == list(range(12))


def test_manual_inheritance_slices_heads_widths_and_layers():
    torch.manual_seed(0)
    teacher = create_model(
        "clip_tiny", vision={"layers": 4, "width": 128}, text={"layers": 4, "width": 128, "heads": 4}
    )
    student_cfg = CLIPConfig.from_dict(
        {"embed_dim": 48, "vision": {**teacher.config.to_dict()["vision"], "layers": 2, "width": 64, "heads": 2}}
        | {"text": {**teacher.config.to_dict()["text"], "layers": 2, "width": 64, "heads": 2}}
    )
    student = inherit_manual(teacher, student_cfg)
    t, s = teacher.state_dict(), student.state_dict()
    assert s["visual.proj"].shape == (64, 48) and torch.equal(s["visual.proj"], t["visual.proj"][:64, :48])
    # student layer 1 <- teacher layer 2; q/k/v keep the first 2 heads of 32 channels each
    w_t = t["transformer.resblocks.2.attn.in_proj_weight"].view(3, 4, 32, 128)
    assert torch.equal(s["transformer.resblocks.1.attn.in_proj_weight"], w_t[:, :2, :, :64].reshape(192, 64))
    assert torch.equal(
        s["visual.transformer.resblocks.1.mlp.c_fc.weight"],
        t["visual.transformer.resblocks.2.mlp.c_fc.weight"][:256, :64],
    )
    assert torch.equal(s["logit_scale"], t["logit_scale"])
    images, tokens = tiny_batch()
    with torch.no_grad():
        assert all(torch.isfinite(x).all() for x in student(images, tokens))


def test_manual_inheritance_with_the_teachers_config_reproduces_it():
    torch.manual_seed(0)
    teacher = create_model("clip_tiny").eval()
    student = inherit_manual(teacher, teacher.config).eval()
    images, tokens = tiny_batch()
    with torch.no_grad():
        for a, b in zip(teacher(images, tokens), student(images, tokens)):
            assert torch.equal(a, b)


# -- automatic inheritance -------------------------------------------------------------------------
def test_hard_concrete_samples_and_deterministic_masks():
    torch.manual_seed(0)
    z = hard_concrete_sample(torch.zeros(10_000))
    assert z.min() == 0 and z.max() == 1 and 0.3 < z.mean() < 0.7  # exact zeros and ones, and values between
    assert (hard_concrete_sample(torch.full((1000,), 10.0)) == 1).float().mean() > 0.99
    log_alpha = torch.linspace(-4, 4, 50)
    det = deterministic_mask(log_alpha)
    assert (det == 0).sum() > 0 and torch.equal(det == 0, log_alpha <= log_alpha[(det == 0).sum() - 1])
    # round(expected zeros): P(z = 0) = sigmoid(log(1/11) beta - log alpha) under the stretched concrete
    assert (det == 0).sum() == round(torch.sigmoid(math.log(1 / 11) * 2 / 3 - log_alpha).sum().item())
    kept = det != 0
    torch.testing.assert_close(det[kept], torch.sigmoid(log_alpha[kept] / (2 / 3) * 0.8))


def test_mask_sizes_and_reference_prunable_counts():
    with torch.device("meta"):
        config = create_model("clip_vit_b_32").config
    masks = L0Masks(config)
    # reference: L * H * (4W^2 + 4W) // H + L * (2 W M + W + M)
    assert masks.towers["visual"].prunable() == 12 * 12 * ((4 * 768**2 + 4 * 768) // 12) + 12 * (
        2 * 768 * 3072 + 768 + 3072
    )
    assert masks.towers["text"].prunable() == 12 * 8 * ((4 * 512**2 + 4 * 512) // 8) + 12 * (
        2 * 512 * 2048 + 512 + 2048
    )
    assert len(masks.towers["visual"].heads) == 12 and masks.towers["visual"].mlp[0].shape == (3072,)
    assert masks.towers["text"].hidden.shape == (512,) and masks.towers["text"].hidden[0].item() == 10.0
    assert 0 < masks.expected_sparsity() < 0.01  # log α = 10: almost everything kept


def test_lagrangian_is_one_sided_and_its_multipliers_ascend():
    masks = L0Masks(create_model("clip_tiny").config, target_sparsity=0.5, start_sparsity=0.1, warmup_steps=100)
    assert [masks.target_sparsity(s) for s in (0, 50, 100, 500)] == pytest.approx([0.1, 0.3, 0.5, 0.5])
    loss, expected, target = masks.lagrangian(step=100)
    gap = target - expected.item()
    assert loss.item() == pytest.approx(10 * gap + 10 * gap**2, rel=1e-5) and loss > 0
    opt = torch.optim.AdamW(masks.param_groups())
    loss.backward()
    assert masks.lambda_1.grad > 0 and masks.towers["visual"].hidden.grad.abs().sum() > 0
    opt.step()
    assert masks.lambda_1.item() > 10 and masks.lambda_2.item() > 10  # ascended
    masks.constrain_()
    assert max(p.max().item() for p in masks.mask_parameters()) == pytest.approx(math.log(100))
    with torch.no_grad():
        for p in masks.mask_parameters():
            p.fill_(-4.6)  # everything expected pruned: sparsity above any target
    loss, expected, _ = masks.lagrangian(step=100)
    assert expected > 0.5 and loss.item() == 0.0


def test_pruned_model_equals_the_masked_model():
    torch.manual_seed(0)
    model = create_model("clip_tiny").eval()
    masks = L0Masks(model.config)
    with torch.no_grad():
        for p in masks.mask_parameters():
            p.uniform_(-3, 5)
        masks.towers["visual"].heads[1].fill_(-4.6)  # one layer loses every head
    det = masks.eval()()
    assert (det.visual.heads[1] == 0).all() and (det.text.hidden == 0).any() and (det.visual.mlp[0] == 0).any()
    pruned = prune(model, masks)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert pruned.config.vision.layer_heads()[1] == 0 and pruned.config.text.width < 64
    images, tokens = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            pruned.encode_image(images), model.encode_image(images, det.visual), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(pruned.encode_text(tokens), model.encode_text(tokens, det.text), atol=1e-5, rtol=0)
        # a non-registered CLIP is rebuilt from its spec, then reads its own shapes back from a state dict
        rebuilt = build(spec_of(pruned))
        rebuilt.load_state_dict(pruned.state_dict())
        for a, b in zip(rebuilt(images, tokens), model(images, tokens, det)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert config_from_state_dict(pruned.state_dict(), head_width=32) == pruned.config


def test_partial_masks_and_text_only_pruning():
    torch.manual_seed(0)
    model = create_model("clip_tiny").eval()
    heads_only = TowerMask(heads=[torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0])])
    masks = CLIPMasks(text=heads_only)
    pruned = prune(model, masks)
    assert pruned.config.vision == model.config.vision and pruned.config.text.layer_heads() == [1, 2]
    images, tokens = tiny_batch()
    with torch.no_grad():
        for a, b in zip(pruned(images, tokens), model(images, tokens, masks)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter_and_every_mask():
    torch.manual_seed(0)
    model = create_model("clip_tiny")
    masks = L0Masks(model.config, init_log_alpha=1.0)  # samples strictly inside (0, 1) sometimes
    images, tokens = tiny_batch()
    img, txt, scale = model(images, tokens, masks())
    logits = scale * img @ txt.T
    labels = torch.arange(3)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    (loss + masks.lagrangian(0)[0]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert all(p.grad is not None for p in masks.parameters())
