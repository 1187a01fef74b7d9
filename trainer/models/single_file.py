"""Single-file (original ldm layout) checkpoints: load into SDComponents, and export.

Loading converts with diffusers' own ldm->diffusers functions (`single_file_utils`) against the
bundled component configs, so nothing is downloaded. Export uses `ldm_keys` (diffusers has no
diffusers->ldm converter) and writes the layout A1111 / ComfyUI load, plus, for v-prediction
and SD2 models, the `.yaml` A1111 needs beside the file to know the parameterization
(`a1111_yaml`). Files get the user's umask, as checkpoints do.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from trainer.models.a1111_yaml import write_a1111_yaml
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
    SDComponents,
    cast,
    load_tokenizer,
    training_scheduler_config,
    with_zero_terminal_snr,
)
from trainer.models.ldm_keys import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_to_ldm,
    open_clip_key,
    open_clip_tail,
    open_clip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from trainer.models.openclip_extras import extras_from_single_file
from trainer.runtime.errors import ModelLoadError
from trainer.runtime.fileperm import apply_umask

logger = logging.getLogger(__name__)

# Keys real checkpoints carry that our modules do not have, and that carry no weights we need:
# CLIP's position_ids buffer, OpenCLIP's projection/logit scale (SD uses hidden states only).
_IGNORABLE_TEXT_KEYS = {"embeddings.position_ids", "text_projection.weight", "logit_scale"}


def _load_strict(
    module: torch.nn.Module, state_dict: dict, what: str, path: Path, file_key: Callable[[str], str]
) -> None:
    """Assign converted tensors to a meta-initialised module; every parameter must be present.

    Shapes are checked first so that a mismatch names the file's key and both shapes
    (`load_state_dict` would raise a bare RuntimeError listing module keys only).
    `file_key` maps a module key back to the key that holds it in the file.
    """
    none_keys = [k for k, v in state_dict.items() if v is None]
    if none_keys:
        raise ModelLoadError(f"{path}: {what} weights missing from the file (e.g. {none_keys[:3]})")
    wanted = module.state_dict()
    wrong = [k for k, v in state_dict.items() if k in wanted and v.shape != wanted[k].shape]
    if wrong:
        k = wrong[0]
        raise ModelLoadError(
            f"{path}: {what} tensor {file_key(k)!r} has shape {list(state_dict[k].shape)}, but a "
            f"{what} of this layout needs {list(wanted[k].shape)} there ({len(wrong)} tensor(s) of the "
            f"wrong shape, e.g. {[file_key(x) for x in wrong[:3]]}). The file is damaged, or a model "
            "variant this trainer does not support."
        )
    result = module.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"{path}: {what} weights do not fit the {what} architecture: missing "
            f"{[file_key(k) for k in result.missing_keys[:5]]} ({len(result.missing_keys)}), unexpected "
            f"{result.unexpected_keys[:5]} ({len(result.unexpected_keys)}). The file is damaged or of an "
            "unsupported variant."
        )


def _convert(convert: Callable[..., dict], what: str, path: Path, *args, **kwargs) -> dict:
    """Run one of diffusers' ldm->diffusers converters; a file it cannot convert is a ModelLoadError."""
    try:
        return convert(*args, **kwargs)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise ModelLoadError(
            f"{path}: the {what} weights cannot be converted ({type(e).__name__}: {e}); the file is "
            "damaged or of a layout this trainer does not support"
        ) from e


def _file_key_of(convert_one: Callable[[dict], dict]) -> Callable[[str], str]:
    """A module-key -> file-key mapper from a diffusers->ldm converter (for error messages)."""

    def file_key(key: str) -> str:
        try:
            return next(iter(convert_one({key: torch.empty(0)})))
        except (KeyError, StopIteration):
            return key

    return file_key


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def vae_from_tensors(tensors: dict[str, torch.Tensor], config: dict, path: Path) -> AutoencoderKL:
    """A VAE from ldm keys (with or without `first_stage_model.`) or diffusers keys."""
    file_key: Callable[[str], str]
    if any(k.startswith("encoder.down_blocks.") for k in tensors):
        converted, file_key = dict(tensors), str
    else:
        prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in tensors) else ""
        tensors = _with_prefix(tensors, VAE_PREFIX) if prefix else tensors
        converted = _convert(convert_ldm_vae_checkpoint, "VAE", path, tensors, config)
        to_ldm = _file_key_of(lambda sd: vae_to_ldm(sd, config))
        file_key = to_ldm if prefix else (lambda k: to_ldm(k).removeprefix(VAE_PREFIX))
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    _load_strict(vae, converted, "VAE", path, file_key)
    return vae


def text_encoder_from_tensors(
    tensors: dict[str, torch.Tensor], family: str, config: dict, path: Path
) -> tuple[CLIPTextModel, dict[str, torch.Tensor]]:
    """The text encoder, and (SD2) the file's OpenCLIP tensors it has no place for."""
    te_config = CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"})
    with init_empty_weights():
        model = CLIPTextModel(te_config)
    extras: dict[str, torch.Tensor] = {}
    if family == "sd2":
        n = te_config.num_hidden_layers
        openclip = _with_prefix(tensors, OPEN_CLIP_PREFIX)
        extras = extras_from_single_file(openclip, n, te_config.hidden_size, path)
        # SD2 files have one more OpenCLIP block than SD2 uses (penultimate layer): it is not
        # converted. Without text_projection, diffusers splits q/k/v by the model's width rather
        # than by that tensor's first dimension, which other tools may have written wrongly.
        skip = (f"{OPEN_CLIP_PREFIX}transformer.resblocks.{n}.", OPEN_CLIP_PREFIX + "text_projection")
        openclip = {k: v for k, v in openclip.items() if not k.startswith(skip)}
        converted = _convert(
            convert_open_clip_checkpoint, "text encoder", path, model, openclip, prefix=OPEN_CLIP_PREFIX
        )
        file_key = _file_key_of(lambda sd: {OPEN_CLIP_PREFIX + open_clip_key(k): v for k, v in sd.items()})
    else:
        converted = _convert(
            convert_ldm_clip_checkpoint,
            "text encoder",
            path,
            _with_prefix(tensors, "cond_stage_model.transformer."),
        )
        file_key = _file_key_of(lambda sd: {CLIP_PREFIX + k: v for k, v in sd.items()})
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if k not in _IGNORABLE_TEXT_KEYS}
    _load_strict(model, converted, "text encoder", path, file_key)
    return model, extras


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
    converted = _convert(
        convert_ldm_unet_checkpoint, "UNet", ckpt.path, _with_prefix(ckpt.tensors, UNET_PREFIX), unet.config
    )
    _load_strict(unet, converted, "UNet", ckpt.path, _file_key_of(lambda sd: unet_to_ldm(sd, unet_config)))
    vae = vae_from_tensors(_with_prefix(ckpt.tensors, VAE_PREFIX), cfg.vae, ckpt.path)
    text_encoder, extras = text_encoder_from_tensors(ckpt.tensors, family, cfg.text_encoder, ckpt.path)
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
        text_encoder_extras={k: v.to(dtype) for k, v in extras.items()},
    )


def load_single_file(path: Path, *, prediction_type: str | None, dtype: torch.dtype) -> SDComponents:
    return components_from_checkpoint(read_checkpoint(path), prediction_type=prediction_type, dtype=dtype)


def ldm_state_dict(components: SDComponents) -> dict[str, torch.Tensor]:
    """All three modules in the original layout (tensors shared with the modules)."""
    out = unet_to_ldm(components.unet.state_dict(), components.unet.config)
    out.update(vae_to_ldm(components.vae.state_dict(), components.vae.config))
    te = components.text_encoder.state_dict()
    if components.family == "sd2":
        text = open_clip_to_ldm(te)
        tail = open_clip_tail(text, components.text_encoder.config.num_hidden_layers)
        tail.update({k: v for k, v in components.text_encoder_extras.items() if k in tail})
        out.update(text | tail)
    else:
        out.update(clip_to_ldm(te))
    return out


def save_single_file(
    components: SDComponents, path: Path, *, half: bool = True, dtype: torch.dtype | None = None
) -> list[Path]:
    """Write an A1111/ComfyUI-loadable `.safetensors` (and the `.yaml` A1111 needs); returns written paths.

    Floating-point tensors are written in `dtype` when given (save_precision), else fp16 when
    `half`, else in their own dtype.

    The file is written under a temporary name and renamed, so a crash never leaves a
    truncated checkpoint under the final name.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"single-file export path {path} must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in ldm_state_dict(components).items():
        want = v.dtype
        if v.is_floating_point():
            want = dtype if dtype is not None else torch.float16 if half else v.dtype
        tensors[k] = v.detach().to(device="cpu", dtype=want).contiguous()  # no GPU-side copies
    metadata = {
        "format": "pt",
        META_FAMILY: components.family,
        META_PREDICTION_TYPE: components.prediction_type,
    }
    if components.scheduler_config.get("rescale_betas_zero_snr"):
        metadata[META_ZERO_SNR] = "true"
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    apply_umask(tmp)  # safetensors writes 0600 files; other accounts' tools must read ours
    os.replace(tmp, path)
    written = [path]
    yaml_path = write_a1111_yaml(components, path)
    if yaml_path is not None:
        apply_umask(yaml_path)
        written.append(yaml_path)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written
