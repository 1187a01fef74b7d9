"""SD2's unused OpenCLIP tensors: taken from a single file, kept in a pipeline folder, checked.

An SD2.x single file holds the whole OpenCLIP text tower, but SD2 conditions on the penultimate
layer, so the text encoder (diffusers' and ours) has no place for the last block,
`text_projection` or `logit_scale`. `SDComponents.text_encoder_extras` carries them, keyed as in
the single file, so that an export writes them back as imported instead of made-up ones.

Every resume loads the checkpoint's `pipeline/` folder, so the folder must carry them too, or
"resumes exactly" would not hold for the exported file. They are stored beside the text
encoder's weights as `text_encoder/openclip_extras.safetensors`: transformers reads only
`model.safetensors` (or its shard index) there and diffusers only what `model_index.json`
names, so every other tool loads the folder as before and never sees them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from trainer.models.ldm_keys import OPEN_CLIP_PREFIX, open_clip_to_ldm
from trainer.runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)

EXTRAS_FILE = "openclip_extras.safetensors"  # not a name transformers or diffusers ever read
PROJECTION = OPEN_CLIP_PREFIX + "text_projection"
LOGIT_SCALE = OPEN_CLIP_PREFIX + "logit_scale"
_CONTENT = "sdtrainer.content"


def _block_prefix(layer: int) -> str:
    return f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}."


def extras_from_single_file(
    tensors: dict[str, torch.Tensor], layers: int, width: int, path: Path
) -> dict[str, torch.Tensor]:
    """A single file's OpenCLIP tensors beyond what SD2 uses, when they fit this model (else none).

    `tensors` are the file's `cond_stage_model.model.*` tensors. kohya sd-scripts writes a
    1024x1024 `text_projection` whatever the model's width; keeping such a tensor would hand the
    next loader a wrong q/k/v split, so it is dropped, loudly.
    """
    last, ref = _block_prefix(layers), _block_prefix(layers - 1)
    block = {k: v for k, v in tensors.items() if k.startswith(last)}
    extras = {}
    if block and all(
        tensors.get(ref + k[len(last) :]) is not None and v.shape == tensors[ref + k[len(last) :]].shape
        for k, v in block.items()
    ):
        extras.update(block)
    elif block:
        logger.warning(
            "%s: OpenCLIP block %d does not match block %d; it is not kept", path, layers, layers - 1
        )
    projection = tensors.get(PROJECTION)
    if projection is not None and projection.ndim == 2 and projection.shape[0] == width:
        extras[PROJECTION] = projection
    elif projection is not None:
        logger.warning(
            "%s: text_projection has shape %s, not [%d, ...] for this %d-wide text encoder (a dummy "
            "written by another tool?); it is ignored, and exports write a fitting one",
            path,
            list(projection.shape),
            width,
            width,
        )
    scale = tensors.get(LOGIT_SCALE)
    if scale is not None and scale.numel() == 1:
        extras[LOGIT_SCALE] = scale.reshape(()).float()  # kohya writes int 1
    return extras


def save_extras(extras: dict[str, torch.Tensor], text_encoder_folder: Path) -> Path | None:
    """Write `extras` into a pipeline folder's text_encoder/ (and remove a stale file when none)."""
    path = Path(text_encoder_folder) / EXTRAS_FILE
    if not extras:
        path.unlink(missing_ok=True)
        return None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in extras.items()}
    metadata = {"format": "pt", _CONTENT: "OpenCLIP tensors SD2 does not use, for single-file exports"}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _expected_shapes(text_encoder: CLIPTextModel) -> dict[str, torch.Size]:
    """Shapes of the extra block's tensors: those of the last block the model has."""
    n = text_encoder.config.num_hidden_layers
    used = f"encoder.layers.{n - 1}."
    last = {
        k: v for k, v in text_encoder.state_dict().items() if k.removeprefix("text_model.").startswith(used)
    }
    src, dst = _block_prefix(n - 1), _block_prefix(n)
    return {dst + k[len(src) :]: v.shape for k, v in open_clip_to_ldm(last).items()}


def _misfit(key: str, tensor: torch.Tensor, block: dict[str, torch.Size], width: int) -> str | None:
    """Why `tensor` cannot be the model's `key` (None when it can)."""
    if key in block:
        ok = tensor.shape == block[key]
        return None if ok else f"has shape {list(tensor.shape)}, needs {list(block[key])}"
    if key == PROJECTION:
        ok = tensor.ndim == 2 and tensor.shape[0] == width
        return None if ok else f"has shape {list(tensor.shape)}, needs [{width}, ...]"
    if key == LOGIT_SCALE:
        return None if tensor.numel() == 1 else f"has shape {list(tensor.shape)}, needs one value"
    return "is not an OpenCLIP tensor SD2 leaves unused"


def load_extras(
    text_encoder_folder: Path, text_encoder: CLIPTextModel, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The extras a pipeline folder keeps for `text_encoder` (none when it has no extras file).

    The file is ours, so one that does not fit the model is an error, never dropped quietly:
    exports would otherwise write other tensors than the folder holds.
    """
    path = Path(text_encoder_folder) / EXTRAS_FILE
    if not path.is_file():
        return {}
    try:
        extras = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(
            f"{path} is not a readable .safetensors file ({e}); delete it, and single-file exports "
            "make up these unused OpenCLIP tensors"
        ) from e
    block = _expected_shapes(text_encoder)
    width = text_encoder.config.hidden_size
    for key, tensor in extras.items():
        why = _misfit(key, tensor, block, width)
        if why is not None:
            raise ModelLoadError(
                f"{path}: tensor {key!r} {why} for this {width}-wide, "
                f"{text_encoder.config.num_hidden_layers}-layer text encoder. The file does not belong "
                "to this model; delete it, and single-file exports make up these unused tensors."
            )
    logger.info("%s: %d OpenCLIP tensors SD2 does not use, kept for single-file exports", path, len(extras))
    return {k: v.to(dtype) for k, v in extras.items()}
