"""CLIP (a ViT image tower and a causal text transformer, each projected to a shared embedding) with
open_clip's state-dict keys, so open_clip and TinyCLIP checkpoints load with `strict=True`, and the
released TinyCLIP ViT models (microsoft/Cream `TinyCLIP/src/open_clip/model_configs/`) registered.

    model = vitnas.create_model("tinyclip_vit_8m_16_text_3m")
    load_clip_weights(model, "TinyCLIP-ViT-8M-16-Text-3M-YFCC15M.pt")   # TinyCLIP or open_clip layout
    img, txt, scale = model(images, tokenize(["a dog", "a cat"]))       # normalised features, exp(scale)

Images are normalised by the caller with `CLIP_MEAN` / `CLIP_STD`. Towers may have per-layer head counts and
MLP widths, and an attention width (heads x head_width) other than the residual width: that is what a
pruned model (`vitnas.models.clip_inherit.prune`) is. Structured masks (`TowerMask`: hidden channels,
heads, MLP units; TinyCLIP's automatic weight inheritance) are applied when passed to `encode_*` /
`forward`, as the reference's masked forward does; the model itself holds no mask state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitnas.models.registry import register_model
from vitnas.models.weights import read_state_dict

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPMasks",
    "CLIPTextConfig",
    "CLIPTowerConfig",
    "CLIPVisionConfig",
    "CLIP_MEAN",
    "CLIP_STD",
    "TowerMask",
    "config_from_state_dict",
    "convert_tinyclip_state_dict",
    "load_clip_weights",
]

log = logging.getLogger(__name__)

# OpenAI CLIP's image normalisation (open_clip OPENAI_DATASET_MEAN / STD), used by every TinyCLIP model
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class CLIPTowerConfig:
    """Shared by both towers. `heads` / `mlp_width` are one value for every layer, or a list (one per layer,
    a pruned model); `heads` None means width // 64 (open_clip's vision rule: head_width 64), and the text
    tower's head width is width // heads (open_clip's) unless given."""

    width: int = 512  # residual width
    layers: int = 12
    heads: int | list[int] | None = None
    head_width: int | None = None  # q/k/v width of one head; None: 64 (vision), width // heads (text)
    mlp_ratio: float = 4.0  # MLP width = int(width * mlp_ratio) unless mlp_width is given
    mlp_width: int | list[int] | None = None

    def head_dim(self) -> int:
        if self.head_width is not None:
            return self.head_width
        if isinstance(self.heads, int):
            return self.width // self.heads
        return 64

    def layer_heads(self) -> list[int]:
        h = self.width // self.head_dim() if self.heads is None else self.heads
        return self._per_layer(h, "heads")

    def layer_mlp(self) -> list[int]:
        m = int(self.width * self.mlp_ratio) if self.mlp_width is None else self.mlp_width
        return self._per_layer(m, "mlp_width")

    def _per_layer(self, value: int | Sequence[int], name: str) -> list[int]:
        if isinstance(value, int):
            return [value] * self.layers
        if len(value) != self.layers:
            raise ValueError(f"{name} has {len(value)} entries for {self.layers} layers")
        return [int(v) for v in value]


@dataclass
class CLIPVisionConfig(CLIPTowerConfig):
    width: int = 768
    image_size: int = 224
    patch_size: int = 32


@dataclass
class CLIPTextConfig(CLIPTowerConfig):
    heads: int | list[int] | None = 8
    context_length: int = 77
    vocab_size: int = 49408


@dataclass
class CLIPConfig:
    """A CLIP model: plain JSON through `to_dict` / `from_dict` (which also reads open_clip's model-config
    layout, `vision_cfg` / `text_cfg`). Defaults are ViT-B/32."""

    embed_dim: int = 512  # shared image-text embedding
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    quick_gelu: bool = False  # OpenAI's weights use QuickGELU; LAION's and TinyCLIP's use GELU

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPConfig:
        extra = set(d) - {"embed_dim", "vision", "text", "vision_cfg", "text_cfg", "quick_gelu"}
        if extra:
            raise ValueError(f"unsupported CLIP options {sorted(extra)} (a CLIP has no classifier head or drop path)")
        vision = dict(d.get("vision", d.get("vision_cfg", {})))
        text = dict(d.get("text", d.get("text_cfg", {})))
        known = {f.name for f in dataclasses.fields(CLIPVisionConfig)}
        unknown = (set(vision) - known) | (set(text) - {f.name for f in dataclasses.fields(CLIPTextConfig)})
        if unknown:
            raise ValueError(f"unsupported CLIP tower options {sorted(unknown)}")
        return cls(
            embed_dim=int(d.get("embed_dim", 512)),
            vision=CLIPVisionConfig(**vision),
            text=CLIPTextConfig(**text),
            quick_gelu=bool(d.get("quick_gelu", False)),
        )


# -- masks -----------------------------------------------------------------------------------------
@dataclass
class TowerMask:
    """Multiplicative structured masks of one tower (TinyCLIP / CoFi): `hidden` (width,) on the residual
    channels, `heads[i]` (heads_i,) on layer i's head outputs, `mlp[i]` (mlp_width_i,) on its MLP units.
    Any part may be None (not masked). A hidden channel whose mask is 0 is also left out of every
    LayerNorm's statistics, as the reference does, so pruning it changes nothing."""

    hidden: Tensor | None = None
    heads: Sequence[Tensor] | None = None
    mlp: Sequence[Tensor] | None = None


@dataclass
class CLIPMasks:
    visual: TowerMask | None = None
    text: TowerMask | None = None


def masked_layer_norm(ln: nn.LayerNorm, x: Tensor, hidden: Tensor | None) -> Tensor:
    """`ln(x)` over the channels whose hidden mask is non-zero only, zero elsewhere: exactly the LayerNorm
    of a model with those channels removed."""
    if hidden is None:
        return ln(x)
    keep = (hidden != 0).to(x.dtype)
    n = keep.sum().clamp_min(1)
    mean = (x * keep).sum(-1, keepdim=True) / n
    var = ((x - mean) * keep).pow(2).sum(-1, keepdim=True) / n
    return ((x - mean) * torch.rsqrt(var + ln.eps) * ln.weight + ln.bias) * keep


# -- layers (open_clip's module names) -------------------------------------------------------------
def _linear(n_in: int, n_out: int) -> nn.Linear:
    """nn.Linear, quiet about the empty weights of a pruned layer with no heads or MLP units left."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        return nn.Linear(n_in, n_out)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (`in_proj_weight`,
    `in_proj_bias`, `out_proj`), but with a q/k/v width (heads x head_width) free of the residual width,
    and any number of heads including none (a layer whose heads were all pruned adds only its bias)."""

    def __init__(self, width: int, heads: int, head_width: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, head_width
        inner = heads * head_width
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner))
        self.out_proj = _linear(inner, width)

    def forward(self, x: Tensor, causal: bool = False, head_mask: Tensor | None = None) -> Tensor:
        B, N, _ = x.shape
        if self.num_heads == 0:
            return self.out_proj(x.new_zeros(B, N, 0))
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, N, head_dim) each
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if head_mask is not None:
            out = out * head_mask.view(1, -1, 1, 1)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, -1))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.c_fc = _linear(width, hidden)
        self.gelu = act()
        self.c_proj = _linear(hidden, width)

    def forward(self, x: Tensor, unit_mask: Tensor | None = None) -> Tensor:
        x = self.gelu(self.c_fc(x))
        return self.c_proj(x if unit_mask is None else x * unit_mask)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, head_width: int, mlp_width: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, head_width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, mlp_width, act)

    def forward(
        self,
        x: Tensor,
        causal: bool,
        hidden: Tensor | None = None,
        heads: Tensor | None = None,
        mlp: Tensor | None = None,
    ) -> Tensor:
        a = self.attn(masked_layer_norm(self.ln_1, x, hidden), causal, heads)
        x = x + (a if hidden is None else a * hidden)
        m = self.mlp(masked_layer_norm(self.ln_2, x, hidden), mlp)
        return x + (m if hidden is None else m * hidden)


class Transformer(nn.Module):
    def __init__(self, cfg: CLIPTowerConfig, act: type[nn.Module]) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, h, cfg.head_dim(), m, act)
            for h, m in zip(cfg.layer_heads(), cfg.layer_mlp())
        )

    def forward(self, x: Tensor, causal: bool = False, mask: TowerMask | None = None) -> Tensor:
        mask = mask or TowerMask()
        for i, block in enumerate(self.resblocks):
            heads = None if mask.heads is None else mask.heads[i]
            mlp = None if mask.mlp is None else mask.mlp[i]
            x = block(x, causal, mask.hidden, heads, mlp)
        return x


class VisionTransformer(nn.Module):
    """open_clip's ViT image tower: patchify, class token, learned positions, pre-LN, blocks, post-LN on
    the class token, projection."""

    def __init__(self, cfg: CLIPVisionConfig, embed_dim: int, act: type[nn.Module]) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        w, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, w) * w**-0.5)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(cfg, act)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.randn(w, embed_dim) * w**-0.5)

    def forward(self, images: Tensor, mask: TowerMask | None = None) -> Tensor:
        hidden = None if mask is None else mask.hidden
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = masked_layer_norm(self.ln_pre, x if hidden is None else x * hidden, hidden)
        x = self.transformer(x, mask=mask)
        x = masked_layer_norm(self.ln_post, x[:, 0], hidden)
        # the reference's pruning folds the hidden mask into `proj`; scaling here keeps masked == pruned
        return (x if hidden is None else x * hidden) @ self.proj


# -- the model -------------------------------------------------------------------------------------
class CLIP(nn.Module):
    """Image and text towers with open_clip's plain-CLIP keys: `visual.*`, then the text tower at the top
    level (`token_embedding`, `positional_embedding`, `transformer.*`, `ln_final`, `text_projection`) and
    `logit_scale`. The causal text mask is built by attention itself, so there is no buffer (open_clip's
    `attn_mask` is non-persistent, so its state dict has none either) and the model builds on the meta
    device."""

    def __init__(self, config: CLIPConfig | None = None) -> None:
        super().__init__()
        config = config or CLIPConfig()
        self.config = config
        act = QuickGELU if config.quick_gelu else nn.GELU
        t = config.text
        self.visual = VisionTransformer(config.vision, config.embed_dim, act)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t, act)
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._init_weights()

    def _init_weights(self) -> None:
        """open_clip's text-tower init, used for both towers' blocks."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.text.width**-0.5)
        for tower, cfg in ((self.visual.transformer, self.config.vision), (self.transformer, self.config.text)):
            proj_std = cfg.width**-0.5 * (2 * cfg.layers) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=cfg.width**-0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * cfg.width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def encode_image(self, images: Tensor, mask: TowerMask | None = None) -> Tensor:
        """(B, embed_dim) unnormalised features of CLIP-normalised images (B, 3, H, W)."""
        return self.visual(images, mask)

    def encode_text(self, tokens: Tensor, mask: TowerMask | None = None) -> Tensor:
        """(B, embed_dim) unnormalised features of token ids (B, context), pooled at the end token (the
        highest id of each row)."""
        hidden = None if mask is None else mask.hidden
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.transformer(x if hidden is None else x * hidden, causal=True, mask=mask)
        x = masked_layer_norm(self.ln_final, x, hidden)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return (x if hidden is None else x * hidden) @ self.text_projection

    def forward(self, images: Tensor, tokens: Tensor, masks: CLIPMasks | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(image features, text features) L2-normalised, and exp(logit_scale): what contrastive and
        affinity-mimicking losses take."""
        masks = masks or CLIPMasks()
        img = F.normalize(self.encode_image(images, masks.visual), dim=-1)
        txt = F.normalize(self.encode_text(tokens, masks.text), dim=-1)
        return img, txt, self.logit_scale.exp()


# -- checkpoints -----------------------------------------------------------------------------------
# keys of OpenAI's TorchScript state dicts that are not weights (open_clip drops them too)
_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


def convert_tinyclip_state_dict(sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """A TinyCLIP (or open_clip / OpenAI) checkpoint's weights in open_clip's plain-CLIP layout.

    TinyCLIP keys: `_image_encoder.[module.]visual.*` -> `visual.*`, `_text_encoder.[module.]*` -> text keys at
    the top level, `_logit_scale.[module.]logit_scale` -> `logit_scale`; a 'state_dict' wrapper and a
    'module.' prefix are removed, mask state (`l0_module`) and non-weight entries are dropped. Plain
    open_clip state dicts pass through unchanged."""
    if isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if "l0_module" in key or key in _NON_WEIGHTS:
            continue
        for prefix in ("_image_encoder.", "_text_encoder.", "_logit_scale."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                key = key[len("module.") :] if key.startswith("module.") else key
                break
        out[key] = value
    return out


def config_from_state_dict(sd: Mapping[str, Tensor], *, head_width: int = 64, quick_gelu: bool = False) -> CLIPConfig:
    """The config of a checkpoint in open_clip's layout, read from its shapes: what an automatically pruned
    TinyCLIP checkpoint (no config file, per-layer head counts and MLP widths) needs. Head width and
    activation cannot be seen in shapes: pass them (TinyCLIP: 64, GELU)."""

    def tower(prefix: str) -> dict[str, Any]:
        start = prefix + "resblocks."
        layers = len({k[len(start) :].split(".")[0] for k in sd if k.startswith(start)})
        heads = [sd[f"{prefix}resblocks.{i}.attn.in_proj_weight"].shape[0] // (3 * head_width) for i in range(layers)]
        mlp = [sd[f"{prefix}resblocks.{i}.mlp.c_fc.weight"].shape[0] for i in range(layers)]
        same = len(set(heads)) == 1 and len(set(mlp)) == 1
        return {
            "layers": layers,
            "head_width": head_width,
            "heads": heads[0] if same and layers else heads,
            "mlp_width": mlp[0] if same and layers else mlp,
        }

    conv = sd["visual.conv1.weight"]
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    vision = {"width": conv.shape[0], "patch_size": conv.shape[-1], "image_size": grid * conv.shape[-1]}
    text = {
        "width": sd["token_embedding.weight"].shape[1],
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "context_length": sd["positional_embedding"].shape[0],
    }
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        vision=CLIPVisionConfig(**vision, **tower("visual.transformer.")),
        text=CLIPTextConfig(**text, **tower("transformer.")),
        quick_gelu=quick_gelu,
    )


def load_clip_weights(model: CLIP, source: str | Path | Mapping[str, Tensor]) -> dict[str, int]:
    """Load an open_clip / TinyCLIP checkpoint (`.pt` read weights-only, `.safetensors`, or a state dict)
    into `model` with strict keys and shapes; returns {'loaded': number of tensors}."""
    name = "state dict" if isinstance(source, Mapping) else str(source)
    sd = convert_tinyclip_state_dict(source if isinstance(source, Mapping) else read_state_dict(source))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{name}: does not fit this CLIP ({err}); build the model from the checkpoint's own shapes with "
            f"CLIP(config_from_state_dict(...)) if it is a pruned one"
        ) from None
    log.info("%s: loaded %d CLIP tensors", name, len(sd))
    return {"loaded": len(sd)}


# -- registered variants ---------------------------------------------------------------------------
def _clip(vision: dict[str, Any], text: dict[str, Any], /, **kw: Any) -> CLIP:
    """A CLIP from tower dicts; keyword overrides: `embed_dim`, `quick_gelu`, and `vision` / `text` dicts
    merged into the towers'."""
    cfg = {"embed_dim": 512, "quick_gelu": False, **kw}
    cfg["vision"] = {**vision, **kw.get("vision", {})}
    cfg["text"] = {**text, **kw.get("text", {})}
    return CLIP(CLIPConfig.from_dict(cfg))


_TEXT_B = {"width": 512, "heads": 8, "layers": 12}


@register_model
def clip_vit_b_32(**kw: Any) -> CLIP:
    """ViT-B/32 with GELU: open_clip's `ViT-B-32` (LAION-2B weights), TinyCLIP's teacher and inheritance
    source (`ViT-B-32@laion2b_e16`)."""
    return _clip({"width": 768, "layers": 12, "patch_size": 32}, _TEXT_B, **kw)


@register_model
def clip_vit_b_32_quickgelu(**kw: Any) -> CLIP:
    """ViT-B/32 with QuickGELU: OpenAI's released weights (open_clip `ViT-B-32-quickgelu`)."""
    return _clip({"width": 768, "layers": 12, "patch_size": 32}, _TEXT_B, **{"quick_gelu": True, **kw})


@register_model
def tinyclip_vit_39m_16_text_19m(**kw: Any) -> CLIP:
    return _clip({"width": 512, "layers": 12, "patch_size": 16}, {"width": 512, "heads": 8, "layers": 6}, **kw)


@register_model
def tinyclip_vit_8m_16_text_3m(**kw: Any) -> CLIP:
    return _clip({"width": 256, "layers": 10, "patch_size": 16}, {"width": 256, "heads": 4, "layers": 3}, **kw)


@register_model
def tinyclip_vit_61m_32_text_29m(**kw: Any) -> CLIP:
    return _clip({"width": 640, "layers": 12, "patch_size": 32}, {"width": 512, "heads": 8, "layers": 9}, **kw)


@register_model
def tinyclip_vit_40m_32_text_19m(**kw: Any) -> CLIP:
    return _clip({"width": 512, "layers": 12, "patch_size": 32}, {"width": 512, "heads": 8, "layers": 6}, **kw)


@register_model
def clip_tiny(**kw: Any) -> CLIP:
    """A CLIP of about 0.2M parameters besides its 49408 x 64 token embedding, for tests and CPU benchmarks:
    32 px images, patch 4, two layers of width 64 with two heads of 32 in each tower."""
    vision = {"width": 64, "layers": 2, "head_width": 32, "patch_size": 4, "image_size": 32}
    text = {"width": 64, "layers": 2, "heads": 2, "head_width": 32}
    return _clip(vision, text, **{"embed_dim": 64, **kw})
