"""Single-file (original ldm layout) checkpoints: load into SDComponents, and export.

Loading converts with diffusers' own ldm->diffusers functions (`single_file_utils`) against the
bundled component configs, so nothing is downloaded. Export uses `ldm_keys` (diffusers has no
diffusers->ldm converter) and writes the layout A1111 / ComfyUI load, plus, for SD2, the
`.yaml` A1111 needs beside the file to know the parameterization.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
import yaml
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from trainer.errors import ModelLoadError
from trainer.models.checkpoint_io import (
    META_FAMILY,
    META_PREDICTION_TYPE,
    META_ZERO_SNR,
    RawCheckpoint,
    detect_family,
    match_configs,
    prediction_type_for,
    read_checkpoint,
)
from trainer.models.components import (
    CONFIGS_DIR,
    SDComponents,
    cast,
    load_tokenizer,
    training_scheduler_config,
    with_zero_terminal_snr,
)
from trainer.models.ldm_keys import (
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_to_ldm,
    open_clip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)

logger = logging.getLogger(__name__)

# Keys real checkpoints carry that our modules do not have, and that carry no weights we need:
# CLIP's position_ids buffer, OpenCLIP's projection/logit scale (SD uses hidden states only).
_IGNORABLE_TEXT_KEYS = {"embeddings.position_ids", "text_projection.weight", "logit_scale"}
YAML_TEMPLATE = CONFIGS_DIR / "v2-inference-v.yaml"


def _load_strict(module: torch.nn.Module, state_dict: dict, what: str, path: Path) -> None:
    """Assign converted tensors to a meta-initialised module; every parameter must be present."""
    none_keys = [k for k, v in state_dict.items() if v is None]
    if none_keys:
        raise ModelLoadError(f"{path}: {what} weights missing from the file (e.g. {none_keys[:3]})")
    result = module.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"{path}: {what} weights do not fit the {what} architecture: missing {result.missing_keys[:5]} "
            f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} "
            f"({len(result.unexpected_keys)}). The file is damaged or of an unsupported variant."
        )


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def vae_from_tensors(tensors: dict[str, torch.Tensor], config: dict, path: Path) -> AutoencoderKL:
    """A VAE from ldm keys (with or without `first_stage_model.`) or diffusers keys."""
    if any(k.startswith("encoder.down_blocks.") for k in tensors):
        converted = dict(tensors)
    else:
        if any(k.startswith(VAE_PREFIX) for k in tensors):
            tensors = _with_prefix(tensors, VAE_PREFIX)
        converted = convert_ldm_vae_checkpoint(tensors, config)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    _load_strict(vae, converted, "VAE", path)
    return vae


def text_encoder_from_tensors(
    tensors: dict[str, torch.Tensor], family: str, config: dict, path: Path
) -> CLIPTextModel:
    te_config = CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"})
    with init_empty_weights():
        model = CLIPTextModel(te_config)
    if family == "sd2":
        converted = convert_open_clip_checkpoint(
            model, _with_prefix(tensors, OPEN_CLIP_PREFIX), prefix=OPEN_CLIP_PREFIX
        )
        n = te_config.num_hidden_layers
        # SD2 files have one more OpenCLIP block than SD2 uses (penultimate layer); drop it.
        converted = {
            k: v for k, v in converted.items() if not k.startswith(f"text_model.encoder.layers.{n}.")
        }
    else:
        converted = convert_ldm_clip_checkpoint(_with_prefix(tensors, "cond_stage_model.transformer."))
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if k not in _IGNORABLE_TEXT_KEYS}
    _load_strict(model, converted, "text encoder", path)
    return model


def components_from_checkpoint(
    ckpt: RawCheckpoint, *, prediction_type: str | None, dtype: torch.dtype
) -> SDComponents:
    """Build SDComponents from an ldm-layout checkpoint using the bundled configs."""
    family = detect_family(ckpt)
    cfg = match_configs(ckpt, family)
    if sum(k.startswith("model_ema.") for k in ckpt.tensors) > 0:
        logger.info("%s also holds EMA weights; the non-EMA weights are loaded for training", ckpt.path)
    unet_config = copy.deepcopy(cfg.unet)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    converted = convert_ldm_unet_checkpoint(_with_prefix(ckpt.tensors, UNET_PREFIX), unet.config)
    _load_strict(unet, converted, "UNet", ckpt.path)
    vae = vae_from_tensors(_with_prefix(ckpt.tensors, VAE_PREFIX), cfg.vae, ckpt.path)
    text_encoder = text_encoder_from_tensors(ckpt.tensors, family, cfg.text_encoder, ckpt.path)
    pred, why = prediction_type_for(ckpt, family, prediction_type)
    logger.info("%s: %s model (%s layout), prediction_type=%s (%s)", ckpt.path, family, cfg.name, pred, why)
    scheduler_config = training_scheduler_config(cfg.scheduler, pred)
    if ckpt.metadata.get(META_ZERO_SNR) == "true":
        scheduler_config = with_zero_terminal_snr(scheduler_config)
    return SDComponents(
        unet=cast(unet, dtype),
        vae=cast(vae, dtype),
        text_encoder=cast(text_encoder, dtype),
        tokenizer=load_tokenizer(cfg.tokenizer),
        scheduler_config=scheduler_config,
        family=family,
        source=f"single file {ckpt.path} ({family}, {cfg.name} layout, {pred} from {why})",
    )


def load_single_file(path: Path, *, prediction_type: str | None, dtype: torch.dtype) -> SDComponents:
    return components_from_checkpoint(read_checkpoint(path), prediction_type=prediction_type, dtype=dtype)


def ldm_state_dict(components: SDComponents) -> dict[str, torch.Tensor]:
    """All three modules in the original layout (tensors shared with the modules)."""
    out = unet_to_ldm(components.unet.state_dict(), components.unet.config)
    out.update(vae_to_ldm(components.vae.state_dict(), components.vae.config))
    te = components.text_encoder.state_dict()
    out.update(open_clip_to_ldm(te) if components.family == "sd2" else clip_to_ldm(te))
    return out


def _a1111_yaml(components: SDComponents) -> str:
    """v2-inference(-v).yaml with this model's UNet/VAE sizes filled in."""
    doc = yaml.safe_load(YAML_TEMPLATE.read_text(encoding="utf-8"))
    params = doc["model"]["params"]
    if components.prediction_type != "v_prediction":
        params.pop("parameterization")
    u, v = components.unet.config, components.vae.config
    unet_params = params["unet_config"]["params"]
    unet_params["model_channels"] = u.block_out_channels[0]
    unet_params["channel_mult"] = [c // u.block_out_channels[0] for c in u.block_out_channels]
    heads = (
        u.attention_head_dim if isinstance(u.attention_head_dim, list | tuple) else [u.attention_head_dim] * 4
    )
    unet_params["num_head_channels"] = u.block_out_channels[0] // heads[0]
    unet_params["context_dim"] = u.cross_attention_dim
    unet_params["num_res_blocks"] = u.layers_per_block
    params["scale_factor"] = v.scaling_factor
    dd = params["first_stage_config"]["params"]["ddconfig"]
    dd["ch"] = v.block_out_channels[0]
    dd["ch_mult"] = [c // v.block_out_channels[0] for c in v.block_out_channels]
    return yaml.safe_dump(doc, sort_keys=False)


def save_single_file(components: SDComponents, path: Path, *, half: bool = True) -> list[Path]:
    """Write an A1111/ComfyUI-loadable `.safetensors` (and the SD2 `.yaml`); returns written paths.

    The file is written under a temporary name and renamed, so a crash never leaves a
    truncated checkpoint under the final name.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"single-file export path {path} must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in ldm_state_dict(components).items():
        dtype = torch.float16 if half and v.is_floating_point() else v.dtype
        tensors[k] = v.detach().to(device="cpu", dtype=dtype).contiguous()  # no GPU-side copies
    metadata = {
        "format": "pt",
        META_FAMILY: components.family,
        META_PREDICTION_TYPE: components.prediction_type,
    }
    if components.scheduler_config.get("rescale_betas_zero_snr"):
        metadata[META_ZERO_SNR] = "true"
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    written = [path]
    if components.family == "sd2":
        yaml_path = path.with_suffix(".yaml")
        yaml_path.write_text(_a1111_yaml(components), encoding="utf-8")
        written.append(yaml_path)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written
