"""Which layers a LoRA covers, and their kohya / A1111 key names.

The layout is kohya sd-scripts' `networks/lora.py` (the one A1111, Forge, ComfyUI and kohya's
own network loader read): a layer's key is its diffusers module name with dots turned into
underscores, after `lora_unet_` or `lora_te_`. The covered layers are kohya's, so that every key
of an extracted file has a module to go to in every one of those loaders:

- UNet: every Linear and Conv2d inside a `Transformer2DModel` (attention q/k/v/out, the
  feed-forward, `proj_in` / `proj_out`, 1x1 convolutions in SD1 and linears in SD2).
- UNet with `conv_rank` > 0 (LoCon): also every Linear and Conv2d inside `ResnetBlock2D`,
  `Downsample2D` and `Upsample2D`. Their 3x3 convolutions take `conv_rank`; their linears and
  1x1 convolutions (`time_emb_proj`, `conv_shortcut`) take the linear rank, as in kohya, whose
  loader only creates those modules when conv layers are on.
- Text encoder: q/k/v/out projections and fc1/fc2 of every CLIP encoder layer, named
  `text_model.encoder.layers.N...` for SD1's CLIP-L and SD2's OpenCLIP alike (the loaders map
  SD2's names onto the OpenCLIP tower themselves).

Layers outside that set (conv_in/conv_out, the time embedding, norms, biases, the token
embedding) have no LoRA key any of those loaders accepts; what the fine-tune changed there is
reported as not carried, never silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D

UNET = "unet"
TEXT_ENCODER = "text_encoder"
LORA_PREFIXES = {UNET: "lora_unet_", TEXT_ENCODER: "lora_te_"}
LINEAR, CONV1X1, CONV = "linear", "conv1x1", "conv"

# kohya's UNET_TARGET_REPLACE_MODULE, and the blocks it adds for conv_dim (LoCon)
_ATTENTION_BLOCKS = (Transformer2DModel,)
_CONV_BLOCKS = (ResnetBlock2D, Downsample2D, Upsample2D)
# transformers 4.x names the encoder `text_model.encoder...`; 5.x builds it without `text_model.`
_TEXT_MODEL = "text_model."
_TEXT_LAYER = re.compile(
    r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])"
)


@dataclass(frozen=True)
class LoraTarget:
    """One layer a LoRA can carry: where it is, what it is called in the file, its shape."""

    component: str  # UNET | TEXT_ENCODER
    module: str  # name in the loaded model's named_modules() (what hooks and state dicts use)
    lora_name: str  # kohya key stem: lora_unet_down_blocks_0_attentions_0_proj_in
    kind: str  # LINEAR | CONV1X1 | CONV (a k x k convolution, k > 1)
    shape: tuple[int, ...]  # the weight's shape
    block: str  # the report's group: unet.down_blocks.0, unet.mid_block, text_encoder.layers.3

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"


def lora_name(component: str, canonical_module: str) -> str:
    """kohya's key stem: prefix + the module name with every dot as an underscore."""
    return LORA_PREFIXES[component] + canonical_module.replace(".", "_")


def layer_kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.Linear):
        return LINEAR
    if isinstance(module, torch.nn.Conv2d):
        return CONV1X1 if tuple(module.kernel_size) == (1, 1) else CONV
    return None


def _unet_block(module: str) -> str:
    parts = module.split(".")
    head = parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])
    return f"{UNET}.{head}"


def unet_targets(unet: torch.nn.Module, *, include_conv: bool) -> list[LoraTarget]:
    """The UNet layers kohya's network has, in module order (see the module docstring)."""
    parents = _ATTENTION_BLOCKS + (_CONV_BLOCKS if include_conv else ())
    found: dict[str, LoraTarget] = {}
    for name, block in unet.named_modules():
        if not isinstance(block, parents):
            continue
        for child_name, child in block.named_modules():
            kind = layer_kind(child)
            if kind is None:
                continue
            module = f"{name}.{child_name}"
            found.setdefault(
                module,
                LoraTarget(
                    UNET,
                    module,
                    lora_name(UNET, module),
                    kind,
                    tuple(child.weight.shape),
                    _unet_block(module),
                ),
            )
    return list(found.values())


def canonical_text_module(name: str) -> str:
    """The transformers 4.x / published-file name of a text-encoder module (`text_model.` first)."""
    return name if name.startswith(_TEXT_MODEL) else _TEXT_MODEL + name


def text_encoder_targets(text_encoder: torch.nn.Module) -> list[LoraTarget]:
    """q/k/v/out projections and fc1/fc2 of every CLIP encoder layer (LORA_CLIP_MAP in the loaders)."""
    out = []
    for name, module in text_encoder.named_modules():
        canonical = canonical_text_module(name)
        match = _TEXT_LAYER.fullmatch(canonical)
        if match is None or layer_kind(module) != LINEAR:
            continue
        block = f"{TEXT_ENCODER}.layers.{int(match.group(1))}"
        out.append(
            LoraTarget(
                TEXT_ENCODER,
                name,
                lora_name(TEXT_ENCODER, canonical),
                LINEAR,
                tuple(module.weight.shape),
                block,
            )
        )
    return out


def block_order(block: str) -> tuple:
    """Sort key for report rows: UNet down, mid, up, then the text encoder's layers, in order."""
    component, _, rest = block.partition(".")
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "layers": 3}
    head, _, index = rest.partition(".")
    return (component != UNET, order.get(head, 9), int(index) if index.isdigit() else 0)
