"""Diffusers -> original (ldm) key layout, the direction diffusers does not ship.

Pure functions over state dicts. The layout is derived from the model config (blocks,
layers per block, which blocks have attention), so the same code serves full-size and tiny
models; tests verify it by converting back with diffusers' own `single_file_utils`.
Tensors are shared with the input, never copied (except where they must change shape).
"""

from __future__ import annotations

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
    """SD1 CLIPTextModel (flat or `text_model.`-prefixed keys) -> `cond_stage_model.transformer.text_model.*`."""
    return {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in state_dict.items()}


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD2 CLIPTextModel -> OpenCLIP `cond_stage_model.model.*` (q/k/v fused into in_proj)."""
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out = {
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    layer_ids = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layer_ids:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            out[f"{dst}attn.out_proj.{kind}"] = sd.pop(f"{src}self_attn.out_proj.{kind}")
            out[f"{dst}ln_1.{kind}"] = sd.pop(f"{src}layer_norm1.{kind}")
            out[f"{dst}ln_2.{kind}"] = sd.pop(f"{src}layer_norm2.{kind}")
            out[f"{dst}mlp.c_fc.{kind}"] = sd.pop(f"{src}mlp.fc1.{kind}")
            out[f"{dst}mlp.c_proj.{kind}"] = sd.pop(f"{src}mlp.fc2.{kind}")
    if sd:
        raise KeyError(f"text encoder keys with no OpenCLIP equivalent: {sorted(sd)[:5]}")
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}
