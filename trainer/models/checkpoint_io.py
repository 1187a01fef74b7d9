"""Reading original-layout (ldm) single files safely, and recognising what they contain.

`.ckpt` files are pickles: they are read with `torch.load(weights_only=True)`, so a file that
would need arbitrary code to unpickle is refused before any of its code runs. The family and
size of the model are recognised from key names and tensor shapes and matched against the
bundled component configs; anything else is refused with an error that says what was found.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from trainer.models.components import BUNDLED_ARCHITECTURES, ComponentConfigs
from trainer.models.ldm_keys import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from trainer.runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
META_PREDICTION_TYPE = "sdtrainer.prediction_type"
META_FAMILY = "sdtrainer.family"
META_ZERO_SNR = "sdtrainer.zero_terminal_snr"  # "true" when trained with rescaled (zero terminal SNR) betas
_SD1_TOKEN_EMB = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_SD1_TOKEN_EMB_OLD = "cond_stage_model.transformer.embeddings.token_embedding.weight"
_SD2_TOKEN_EMB = OPEN_CLIP_PREFIX + "token_embedding.weight"
# How torch names what a weights_only load refused (anything else it reports is a broken pickle).
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global|whose module (\S+) is blocked")
_SD2_V_STEP_HINT = 110000  # the SD2 512-base (epsilon) checkpoint's global_step, as diffusers uses


@dataclass
class RawCheckpoint:
    """Tensors of a single file plus what it says about itself."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    global_step: int | None


def read_checkpoint(path: Path) -> RawCheckpoint:
    """Load all tensors of a `.safetensors` or `.ckpt` without executing code from the file."""
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(
                f"{path} is not a readable .safetensors file ({e}); re-download or re-export it"
            ) from e
        return RawCheckpoint(path, tensors, metadata, None)
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: unknown checkpoint extension {path.suffix!r}; use one of {SINGLE_FILE_SUFFIXES}"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        unsafe = _UNSAFE_GLOBAL.search(str(e))
        if unsafe is None:  # torch words every unpickling failure as a weights_only refusal
            raise ModelLoadError(
                f"{path} is corrupt or not a PyTorch checkpoint: its pickle data cannot be read "
                f"({str(e.__context__ or e).splitlines()[0]}). Re-download or re-export it."
            ) from e
        what = unsafe.group(1) or unsafe.group(2)
        raise ModelLoadError(
            f"refused to load {path}: it needs unsafe unpickling of {what}, which could run "
            "code from the file. Nothing from it was executed. If you trust its origin, convert it to "
            ".safetensors with a tool you trust and load that instead."
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise ModelLoadError(
            f"{path} is corrupt or not a PyTorch checkpoint ({str(e) or type(e).__name__}); it may be "
            "truncated. Re-download or re-export it."
        ) from e
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a state dict")
    step = obj.get("global_step")
    while isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelLoadError(f"{path} contains no tensors")
    return RawCheckpoint(path, tensors, {}, int(step) if isinstance(step, int | torch.Tensor) else None)


def detect_family(ckpt: RawCheckpoint) -> str:
    """sd1 (OpenAI CLIP text encoder) or sd2 (OpenCLIP); refuse other model kinds clearly."""
    t = ckpt.tensors
    if any(k.startswith("conditioner.embedders.") for k in t):
        raise ModelLoadError(f"{ckpt.path} is an SDXL checkpoint; only SD1.x and SD2.x are supported")
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in t:
        raise ModelLoadError(
            f"{ckpt.path} has no Stable Diffusion UNet (no '{UNET_PREFIX}*' keys); is it a VAE, LoRA or "
            "embedding file? Give a full SD1.x/SD2.x checkpoint, or pass a VAE file as `vae`."
        )
    in_ch = t[f"{UNET_PREFIX}input_blocks.0.0.weight"].shape[1]
    if in_ch != 4:
        raise ModelLoadError(
            f"{ckpt.path}: UNet takes {in_ch} input channels (inpainting/depth model?); only 4 is supported"
        )
    if _SD2_TOKEN_EMB in t:
        return "sd2"
    if _SD1_TOKEN_EMB in t or _SD1_TOKEN_EMB_OLD in t:
        return "sd1"
    raise ModelLoadError(
        f"{ckpt.path} has no text encoder (expected '{CLIP_PREFIX}*' for SD1.x or '{OPEN_CLIP_PREFIX}*' for SD2.x)"
    )


def text_encoder_layer_count(tensors: dict[str, torch.Tensor], family: str) -> int:
    """Number of transformer blocks in the checkpoint's text encoder."""
    ids = set()
    for k in tensors:
        parts = k.split(".")
        if family == "sd2" and k.startswith(OPEN_CLIP_PREFIX + "transformer.resblocks."):
            ids.add(int(parts[4]))
        elif family == "sd1" and k.startswith("cond_stage_model.transformer.") and "layers" in parts:
            ids.add(int(parts[parts.index("layers") + 1]))
    return len(ids)


def signature(tensors: dict[str, torch.Tensor], family: str) -> dict[str, int]:
    """The shape facts that select a component config (widths, context, depth)."""
    token_emb = tensors.get(_SD2_TOKEN_EMB if family == "sd2" else _SD1_TOKEN_EMB)
    if token_emb is None:
        token_emb = tensors[_SD1_TOKEN_EMB_OLD]
    attn_k = f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if attn_k not in tensors:
        raise ModelLoadError(f"checkpoint lacks {attn_k}: the UNet has no cross-attention in its first block")
    return {
        "unet_channels": tensors[f"{UNET_PREFIX}input_blocks.0.0.weight"].shape[0],
        "context_dim": tensors[attn_k].shape[1],
        "text_width": token_emb.shape[1],
        "text_layers": text_encoder_layer_count(tensors, family),
        "vae_channels": tensors[f"{VAE_PREFIX}encoder.conv_in.weight"].shape[0]
        if f"{VAE_PREFIX}encoder.conv_in.weight" in tensors
        else -1,
    }


def config_signature(cfg: ComponentConfigs) -> dict[str, int]:
    return {
        "unet_channels": cfg.unet["block_out_channels"][0],
        "context_dim": cfg.unet["cross_attention_dim"],
        "text_width": cfg.text_encoder["hidden_size"],
        "text_layers": cfg.text_encoder["num_hidden_layers"],
        "vae_channels": cfg.vae["block_out_channels"][0],
    }


def match_configs(ckpt: RawCheckpoint, family: str) -> ComponentConfigs:
    """Pick the bundled architecture whose shapes the checkpoint has.

    SD2 files carry 24 OpenCLIP blocks but SD2 uses the penultimate layer, so diffusers' text
    encoder (and ours) has 23: one extra trailing block is accepted and dropped.
    """
    found = signature(ckpt.tensors, family)
    if found["vae_channels"] == -1:
        raise ModelLoadError(f"{ckpt.path} has no VAE ('{VAE_PREFIX}*' keys); pass a VAE with `vae`")
    tried = []
    for name in BUNDLED_ARCHITECTURES:
        cfg = ComponentConfigs.bundled(name)
        if cfg.family != family:
            continue
        want = config_signature(cfg)
        extra_layer_ok = family == "sd2" and found["text_layers"] == want["text_layers"] + 1
        same = all(found[k] == want[k] for k in want if k != "text_layers")
        if same and (found["text_layers"] == want["text_layers"] or extra_layer_ok):
            return cfg
        tried.append(f"{name}: {want}")
    raise ModelLoadError(
        f"{ckpt.path} is an {family} checkpoint with an unknown layout {found}; supported layouts: "
        + "; ".join(tried)
    )


def prediction_type_for(ckpt: RawCheckpoint, family: str, requested: str | None) -> tuple[str, str]:
    """(prediction_type, why). Order: argument, A1111 yaml beside the file, our metadata, heuristics."""
    if requested:
        return requested, "prediction_type argument"
    yaml_path = ckpt.path.with_suffix(".yaml")
    if yaml_path.is_file():
        try:
            params = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))["model"]["params"]
        except (yaml.YAMLError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{yaml_path} beside the checkpoint is not an ldm model config: {e}") from e
        pred = "v_prediction" if params.get("parameterization") == "v" else "epsilon"
        return pred, f"parameterization in {yaml_path.name}"
    if ckpt.metadata.get(META_PREDICTION_TYPE):
        return ckpt.metadata[META_PREDICTION_TYPE], "file metadata"
    if family == "sd1":
        return "epsilon", "SD1.x models predict epsilon"
    if ckpt.global_step == _SD2_V_STEP_HINT:
        return "epsilon", "global_step 110000 (SD2 512-base)"
    logger.warning(
        "%s: SD2.x checkpoint without a .yaml or metadata saying its parameterization; assuming "
        "v_prediction (SD2 768-v). Pass prediction_type='epsilon' for 512-base style models.",
        ckpt.path,
    )
    return "v_prediction", "SD2.x default (assumed)"
