"""The loaded Stable Diffusion parts and the helpers every loader shares.

All loaders (built-in, diffusers folder, single file) end in `SDComponents`, so the trainer
never needs to know where a model came from. Component configs are bundled as JSON under
`configs/<name>/` (diffusers pipeline sub-folder layout) so that nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

# `diffusers.models`, not `diffusers`: mypy resolves the top-level names to dummy placeholder classes.
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from trainer.runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
# Every SD1.x/2.x text encoder is position-limited to 77 tokens; a tokenizer saved without this
# reports 1e30 and diffusers' pipelines then overflow.
MODEL_MAX_LENGTH = 77
FAMILIES = ("sd1", "sd2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Keys of a scheduler config that define the training noise schedule (DDPMScheduler arguments).
_NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
# Keys kept only when the source states them: a zero-terminal-SNR model needs both to sample the way
# it was trained (rescaled betas, and timesteps that include t=999), and dropping them silently
# turns such a model back into a plain-schedule one on load and on export.
_ZERO_SNR_KEYS = ("rescale_betas_zero_snr", "timestep_spacing")


@dataclass
class SDComponents:
    """One SD1.x/SD2.x model: the trainable modules plus what is needed to rebuild a pipeline."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict  # training noise scheduler (DDPMScheduler.from_config-compatible)
    family: str  # "sd1" | "sd2"
    source: str  # human description of what was loaded
    # Original-layout text-encoder tensors of a single source file that the modules have no place
    # for (SD2: OpenCLIP's last block, text_projection, logit_scale). Nothing trains or reads
    # them; the single-file export writes them back instead of made-up ones.
    text_encoder_extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config["prediction_type"]


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def cast(module: ModuleT, dtype: torch.dtype) -> ModuleT:
    """Convert only when needed (diffusers warns on every `.to(dtype)` call)."""
    current = next(module.parameters()).dtype
    return module if current == dtype else module.to(dtype)


def read_json(path: Path) -> dict:
    """Read a JSON config, raising ModelLoadError that names the file when it is absent or broken."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelLoadError(f"missing config file {path}") from e
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"config file {path} is not valid JSON: {e}") from e


def family_of_text_encoder(config: CLIPTextConfig) -> str:
    """SD2 uses OpenCLIP (gelu), SD1 OpenAI CLIP (quick_gelu): the activation tells them apart."""
    return "sd2" if config.hidden_act == "gelu" else "sd1"


def load_tokenizer(tokenizer_config: dict) -> CLIPTokenizer:
    """The bundled CLIP BPE tokenizer with a family's settings (SD2 pads with '!', SD1 with EOS)."""
    settings = {k: v for k, v in tokenizer_config.items() if k != "tokenizer_class"}
    settings["model_max_length"] = MODEL_MAX_LENGTH
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), **settings)


def ensure_model_max_length(tokenizer: CLIPTokenizer, source: str) -> CLIPTokenizer:
    """Repair a tokenizer saved without model_max_length (it reports ~1e30), loudly."""
    if tokenizer.model_max_length != MODEL_MAX_LENGTH:
        logger.warning(
            "tokenizer from %s has model_max_length=%s; using %d (the CLIP text encoder's limit)",
            source,
            tokenizer.model_max_length,
            MODEL_MAX_LENGTH,
        )
        tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer


def training_scheduler_config(scheduler_config: dict, prediction_type: str | None = None) -> dict:
    """Reduce any SD scheduler config to the DDPM training noise schedule plus prediction_type."""
    missing = [k for k in ("beta_start", "beta_end", "beta_schedule") if k not in scheduler_config]
    if missing:
        raise ModelLoadError(f"scheduler config lacks {missing}; it cannot define a noise schedule")
    out = {"_class_name": "DDPMScheduler", "clip_sample": False}
    out.update({k: scheduler_config.get(k) for k in _NOISE_SCHEDULE_KEYS})
    out["num_train_timesteps"] = out["num_train_timesteps"] or 1000
    out.update({k: scheduler_config[k] for k in _ZERO_SNR_KEYS if k in scheduler_config})
    out["prediction_type"] = prediction_type or scheduler_config.get("prediction_type") or "epsilon"
    if out["prediction_type"] not in PREDICTION_TYPES:
        raise ModelLoadError(
            f"prediction_type {out['prediction_type']!r} is not supported; use one of {PREDICTION_TYPES}"
        )
    return out


def with_zero_terminal_snr(scheduler_config: dict) -> dict:
    """The schedule of a model trained with zero terminal SNR (arXiv 2305.08891, section 3).

    Rescaled betas make alpha-bar at the last timestep 0; "trailing" spacing makes inference
    start from that timestep. Both travel with the model so every pipeline built from its
    scheduler config samples the way it was trained.
    """
    return {**scheduler_config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@dataclass(frozen=True)
class ComponentConfigs:
    """The configs of one bundled architecture (a folder under configs/)."""

    name: str
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    tokenizer: dict

    @property
    def family(self) -> str:
        return family_of_text_encoder(CLIPTextConfig(**self.text_encoder))

    @classmethod
    def bundled(cls, name: str) -> ComponentConfigs:
        root = CONFIGS_DIR / name
        if not root.is_dir():
            raise ModelLoadError(f"no bundled component configs named {name!r} under {CONFIGS_DIR}")
        return cls(
            name=name,
            unet=read_json(root / "unet" / "config.json"),
            vae=read_json(root / "vae" / "config.json"),
            text_encoder=read_json(root / "text_encoder" / "config.json"),
            scheduler=read_json(root / "scheduler" / "scheduler_config.json"),
            tokenizer=read_json(root / "tokenizer" / "tokenizer_config.json"),
        )

    def instantiate(
        self, dtype: torch.dtype = torch.float32
    ) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
        """Build randomly initialised modules from these configs (uses the global torch RNG)."""
        unet = UNet2DConditionModel.from_config(self.unet)
        vae = AutoencoderKL.from_config(self.vae)
        te_config = CLIPTextConfig(**{k: v for k, v in self.text_encoder.items() if k != "architectures"})
        text_encoder = CLIPTextModel(te_config)
        return cast(unet, dtype), cast(vae, dtype), cast(text_encoder, dtype)


BUNDLED_ARCHITECTURES = ("sd15", "sd21", "tiny-sd1", "tiny-sd2")
