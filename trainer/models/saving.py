"""Writing SDComponents as a diffusers pipeline folder (single files: single_file.py).

The folder is what every resume loads, so it holds everything a single-file export writes:
also SD2's unused OpenCLIP tensors of an imported single file (`openclip_extras`).
"""

from __future__ import annotations

import logging
from pathlib import Path

# The defining modules: mypy reads `from diffusers import X` as diffusers' dummy placeholder classes.
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from safetensors.torch import save_file
from transformers import CLIPTextModel

from trainer.models.components import MODEL_MAX_LENGTH, SDComponents, read_json
from trainer.models.openclip_extras import save_extras
from trainer.runtime.fileperm import apply_umask

logger = logging.getLogger(__name__)

# Training-schedule keys that also shape inference (zero-terminal-SNR models need both).
_INFERENCE_PASSTHROUGH = ("rescale_betas_zero_snr", "timestep_spacing")
# The key prefix of CLIPTextModel weights in every published SD1.x/SD2.x diffusers folder.
TEXT_MODEL_PREFIX = "text_model."


def inference_scheduler(components: SDComponents) -> DDIMScheduler:
    """DDIM over the model's own noise schedule and prediction type (what SD's configs ship)."""
    cfg = components.scheduler_config
    return DDIMScheduler(
        num_train_timesteps=cfg["num_train_timesteps"],
        beta_start=cfg["beta_start"],
        beta_end=cfg["beta_end"],
        beta_schedule=cfg["beta_schedule"],
        trained_betas=cfg.get("trained_betas"),
        prediction_type=cfg["prediction_type"],
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **{k: cfg[k] for k in _INFERENCE_PASSTHROUGH if k in cfg},
    )


def save_pipeline(components: SDComponents, out_dir: Path) -> None:
    """Write a StableDiffusionPipeline folder that loads offline (no safety checker), with the
    permissions the user's umask gives (safetensors writes 0600 files)."""
    out_dir = Path(out_dir)
    components.tokenizer.model_max_length = MODEL_MAX_LENGTH
    # diffusers annotates `scheduler` with the KarrasDiffusionSchedulers enum (it takes an instance)
    # and the two safety parts as required, though its docs and `requires_safety_checker` allow None.
    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=inference_scheduler(components),  # type: ignore[arg-type]
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    save_canonical_text_encoder(components.text_encoder, out_dir / "text_encoder")
    save_extras(components.text_encoder_extras, out_dir / "text_encoder")
    # transformers 5 writes only tokenizer.json; vocab.json/merges.txt keep the folder loadable by
    # transformers 4 and other tools that use the slow CLIPTokenizer.
    components.tokenizer.backend_tokenizer.model.save(str(out_dir / "tokenizer"))
    saved = read_json(out_dir / "tokenizer" / "tokenizer_config.json")
    if saved.get("model_max_length") != MODEL_MAX_LENGTH:
        raise RuntimeError(
            f"tokenizer saved to {out_dir} without model_max_length {MODEL_MAX_LENGTH}: {saved}"
        )
    apply_umask(out_dir)
    logger.info("wrote diffusers pipeline %s", out_dir)


def save_canonical_text_encoder(text_encoder: CLIPTextModel, folder: Path) -> Path:
    """Rewrite the text encoder's weights with `text_model.*` keys, the published layout.

    transformers 5 saves a freshly built CLIPTextModel without the `text_model.` prefix (it
    restores the prefix only for models it loaded with one). transformers 4.x, which kohya
    sd-scripts and many A1111/ComfyUI extensions pin, then finds none of its keys and keeps a
    randomly initialised text encoder with only a warning. transformers 5 reads both layouts.
    """
    for old in folder.glob("model*.safetensors*"):  # also a shard index, should one exist
        old.unlink()
    tensors = {
        TEXT_MODEL_PREFIX + k.removeprefix(TEXT_MODEL_PREFIX): v.detach().to("cpu").contiguous()
        for k, v in text_encoder.state_dict().items()
    }
    path = folder / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
