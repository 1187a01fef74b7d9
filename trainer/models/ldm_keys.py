"""Diffusers -> original (ldm) key layout, the direction diffusers does not ship.

Pure functions over state dicts. The layout is derived from the model config (blocks,
layers per block, which blocks have attention), so the same code serves full-size and tiny
models; tests verify it by converting back with diffusers' own `single_file_utils`.
Tensors are shared with the input, never copied (except where they must change shape).
"""

from __future__ import annotations

import math

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD1: A1111/ComfyUI need `text_model.`
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2: OpenCLIP names, fused qkv

_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _unet_prefix_map(config: dict) -> dict[str, str]:
    """Diffusers module prefix -> ldm module prefix for every block of the UNet."""
    layers = config["layers_per_block"]
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    m = dict(_UNET_TOP)
    for b, block_type in enumerate(down_types):
        for j in range(layers):
            ldm = f"input_blocks.{1 + b * (layers + 1) + j}"
            m[f"down_blocks.{b}.resnets.{j}"] = f"{ldm}.0"
            if "CrossAttn" in block_type:
                m[f"down_blocks.{b}.attentions.{j}"] = f"{ldm}.1"
        if b < len(down_types) - 1:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{(b + 1) * (layers + 1)}.0.op"
    m["mid_block.resnets.0"] = "middle_block.0"
    m["mid_block.attentions.0"] = "middle_block.1"
    m["mid_block.resnets.1"] = "middle_block.2"
    for b, block_type in enumerate(up_types):
        has_attn = "CrossAttn" in block_type
        for j in range(layers + 1):
            ldm = f"output_blocks.{b * (layers + 1) + j}"
            m[f"up_blocks.{b}.resnets.{j}"] = f"{ldm}.0"
            if has_attn:
                m[f"up_blocks.{b}.attentions.{j}"] = f"{ldm}.1"
        if b < len(up_types) - 1:
            m[f"up_blocks.{b}.upsamplers.0.conv"] = (
                f"output_blocks.{b * (layers + 1) + layers}.{2 if has_attn else 1}.conv"
            )
    return m


def _rename(key: str, prefix_map: dict[str, str], component: str) -> tuple[str, str]:
    """Split `key` into (ldm module prefix, rest) using the longest matching diffusers prefix."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in prefix_map:
            return prefix_map[head], ".".join(parts[n:])
    raise KeyError(f"{component} key {key!r} has no original-layout equivalent (unsupported topology)")


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers UNet2DConditionModel state dict -> `model.diffusion_model.*` keys."""
    prefix_map = _unet_prefix_map(config)
    out = {}
    for key, value in state_dict.items():
        ldm_prefix, rest = _rename(key, prefix_map, "UNet")
        if ".resnets." in key or key.startswith("mid_block.resnets"):
            for new, old in _UNET_RESNET:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new) :]
                    break
        out[f"{UNET_PREFIX}{ldm_prefix}.{rest}"] = value
    return out


def _vae_prefix_map(config: dict) -> dict[str, str]:
    n = len(config["down_block_types"])
    layers = config["layers_per_block"]
    m = {
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
    }
    for side in ("encoder", "decoder"):
        m[f"{side}.conv_in"] = f"{side}.conv_in"
        m[f"{side}.conv_out"] = f"{side}.conv_out"
        m[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        m[f"{side}.mid_block.resnets.0"] = f"{side}.mid.block_1"
        m[f"{side}.mid_block.resnets.1"] = f"{side}.mid.block_2"
        m[f"{side}.mid_block.attentions.0"] = f"{side}.mid.attn_1"
    for i in range(n):
        for j in range(layers):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        # The decoder's up blocks are numbered from the bottom in ldm, from the top in diffusers.
        for j in range(layers + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    return m


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL state dict -> `first_stage_model.*` keys (attention as 1x1 convs)."""
    prefix_map = _vae_prefix_map(config)
    out = {}
    for key, value in state_dict.items():
        ldm_prefix, rest = _rename(key, prefix_map, "VAE")
        if ".attentions." in key:
            for new, old in _VAE_ATTN:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new) :]
                    break
            if value.ndim == 2:  # ldm stores these as Conv2d(1x1) weights
                value = value[:, :, None, None]
        elif rest.startswith("conv_shortcut."):
            rest = "nin_shortcut" + rest[len("conv_shortcut") :]
        out[f"{VAE_PREFIX}{ldm_prefix}.{rest}"] = value
    return out


def clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD1 CLIPTextModel (flat or `text_model.`-prefixed keys) -> `cond_stage_model.transformer.text_model.*`.

    Adds `embeddings.position_ids` (0..76, int64), which the published SD1.x files hold and
    transformers no longer stores: A1111's and ComfyUI's loaders read it when present.
    """
    out = {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in state_dict.items()}
    positions = out.get(CLIP_PREFIX + "embeddings.position_embedding.weight")
    if positions is not None:
        out.setdefault(CLIP_PREFIX + "embeddings.position_ids", torch.arange(positions.shape[0]).unsqueeze(0))
    return out


_OPEN_CLIP_TOP = {
    "embeddings.position_embedding.weight": "positional_embedding",
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_key(key: str) -> str:
    """The OpenCLIP key (without `cond_stage_model.model.`) that holds a CLIPTextModel tensor.

    q/k/v projections all live in one fused `attn.in_proj_*` tensor.
    """
    key = key.removeprefix("text_model.")
    if key in _OPEN_CLIP_TOP:
        return _OPEN_CLIP_TOP[key]
    parts = key.split(".")
    if parts[:2] != ["encoder", "layers"]:
        raise KeyError(f"text encoder key {key!r} has no OpenCLIP equivalent")
    module, kind = ".".join(parts[3:-1]), parts[-1]
    dst = f"transformer.resblocks.{parts[2]}."
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"{dst}attn.in_proj_{kind}"
    if module not in _OPEN_CLIP_LAYER:
        raise KeyError(f"text encoder key {key!r} has no OpenCLIP equivalent")
    return f"{dst}{_OPEN_CLIP_LAYER[module]}.{kind}"


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD2 CLIPTextModel -> OpenCLIP `cond_stage_model.model.*` (q/k/v fused into in_proj)."""
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out = {}
    for key in [k for k in sd if ".self_attn.q_proj." in k]:
        fused = [sd.pop(key.replace(".q_proj.", f".{p}_proj.")) for p in "qkv"]
        out[open_clip_key(key)] = torch.cat(fused, dim=0)
    for key, value in sd.items():
        out[open_clip_key(key)] = value
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


# OpenCLIP ViT-H's logit scale saturates at its clamp, ln(100); OpenCLIP starts it at ln(1/0.07).
_LOGIT_SCALE = math.log(100.0)


def open_clip_tail(ldm: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """What a complete OpenCLIP tower has beyond the `layers` blocks SD2 uses, made up.

    SD2 conditions on the penultimate layer, so diffusers' text encoder (and ours) drops the last
    of OpenCLIP's blocks, and it has no `text_projection` / `logit_scale`; the published SD2.x
    files and ComfyUI's CLIP-H still have them (ComfyUI warns about 18 missing keys otherwise).
    Like kohya sd-scripts, the missing block is a copy of the last one SD2 uses; nothing reads
    its output. The projection is the identity (kohya writes all ones, which maps every prompt to
    one direction) and square, as ViT-H's is: loaders split the fused q/k/v by its first
    dimension, so it must be the width.
    """
    src, dst = (
        f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layers - 1}.",
        f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layers}.",
    )
    tail = {dst + k[len(src) :]: v.clone() for k, v in ldm.items() if k.startswith(src)}
    ref = ldm[OPEN_CLIP_PREFIX + "ln_final.weight"]
    width = ref.shape[0]
    tail[OPEN_CLIP_PREFIX + "text_projection"] = torch.eye(width, dtype=ref.dtype, device=ref.device)
    tail[OPEN_CLIP_PREFIX + "logit_scale"] = torch.tensor(_LOGIT_SCALE, dtype=ref.dtype, device=ref.device)
    return tail
