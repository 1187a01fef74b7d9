"""One micro-batch of training: latents, noise, timesteps, text, UNet, per-sample loss.

The loop owns backward, gradient accumulation and the optimizer; this module only turns a batch
into a per-sample loss with the graph attached. Every sample draws its randomness from its own
CPU `torch.Generator`, seeded with the sample's seed from the batch (`Batch.sample_seeds`, set by the
training loader from the sample's place in the epoch plan), always in this order
(docs/TRAINING_STEP.md):

  1. VAE latent sample (only when the batch has "pixel_values", not cached "latents")
  2. noise: base or pyramid noise, then offset noise
  3. timesteps
  4. input perturbation (only when ip_noise_gamma > 0: its U(0,1) strength, then its noise)
  5. embedding perturbation (only when embedding_perturbation > 0)

So a sample's draws depend on its seed only, not on its batch, rank, process count or on any
state carried between steps: one process and N processes draw the same numbers, and resume is
exact without saving an RNG state. The draws are made on the host and moved to the device in
one copy (the same numbers on CPU and GPU).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from diffusers.models import AutoencoderKL
from torch import Tensor, nn

from trainer.config import TrainConfig
from trainer.data.batch import Batch
from trainer.runtime.errors import ConfigError
from trainer.step import diffusion, losses
from trainer.step.text import ALLOWED_MAX_TOKEN_LENGTHS, encode_captions, perturb_embeddings
from trainer.step.text_cache import TextEmbeddingCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepSettings:
    """The train.json keys that shape a training step (same names as EveryDream2)."""

    zero_frequency_noise_ratio: float = 0.0
    pyramid_noise_discount: float = 0.0
    timestep_start: int = 0
    timestep_end: int = 1000
    min_snr_gamma: float | None = None
    loss_type: str = "mse"
    clip_skip: int = 0
    max_token_length: int = 75
    embedding_perturbation: float = 0.0
    # kohya / OneTrainer options (docs/CONFIG.md); the defaults change nothing.
    pyramid_iterations: int = diffusion.PYRAMID_LEVELS
    noise_offset_random_strength: bool = False
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    debiased_estimation_loss: bool = False
    masked_loss: bool = False
    unmasked_weight: float = 1.0
    normalize_masked_area_loss: bool = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> StepSettings:
        """The step's keys of a run's config (each range already checked by TrainConfig)."""
        pyramid = (
            {}
            if cfg.multires_noise_iterations is None
            else {"pyramid_iterations": cfg.multires_noise_iterations}
        )
        return cls(
            **pyramid,
            zero_frequency_noise_ratio=cfg.zero_frequency_noise_ratio,
            pyramid_noise_discount=cfg.pyramid_discount,
            timestep_start=cfg.timestep_start,
            timestep_end=cfg.timestep_end,
            min_snr_gamma=cfg.min_snr_gamma,
            loss_type=cfg.loss_type,
            clip_skip=cfg.clip_skip,
            max_token_length=cfg.max_token_length,
            embedding_perturbation=cfg.embedding_perturbation,
            noise_offset_random_strength=cfg.noise_offset_random_strength,
            ip_noise_gamma=cfg.ip_noise_gamma or 0.0,
            ip_noise_gamma_random_strength=cfg.ip_noise_gamma_random_strength,
            debiased_estimation_loss=cfg.debiased_estimation_loss,
            masked_loss=cfg.masked_loss,
            unmasked_weight=cfg.unmasked_weight if cfg.masked_loss else 1.0,
            normalize_masked_area_loss=cfg.normalize_masked_area_loss,
        )

    def __post_init__(self) -> None:
        # train.json's config (trainer/config/) refuses each of these with the key's name; a
        # failure here is a caller that built settings around it.
        assert self.zero_frequency_noise_ratio >= 0 and self.pyramid_noise_discount >= 0, self
        assert 0 <= self.timestep_start < self.timestep_end, self
        assert self.min_snr_gamma is None or self.min_snr_gamma > 0, self
        assert self.loss_type in diffusion.LOSS_TYPES, self
        assert self.clip_skip >= 0 and self.max_token_length in ALLOWED_MAX_TOKEN_LENGTHS, self
        assert self.embedding_perturbation >= 0 and self.ip_noise_gamma >= 0, self
        assert 0.0 <= self.unmasked_weight <= 1.0 and self.pyramid_iterations >= 1, self


@dataclass
class StepOutput:
    loss: Tensor  # per-sample weighted loss, shape [B], float32, graph attached
    timesteps: Tensor  # [B], long


def _requires_grad(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class TrainingStep:
    """Computes the per-sample loss of one micro-batch; holds models and settings, no RNG state."""

    def __init__(
        self,
        *,
        unet: nn.Module,
        text_encoder: nn.Module,
        vae: AutoencoderKL | None,
        tokenizer,
        schedule: diffusion.NoiseSchedule,
        settings: StepSettings,
        device: torch.device | str,
        autocast_dtype: torch.dtype | None = None,
        text_cache: TextEmbeddingCache | None = None,
        channels_last: bool = False,
    ) -> None:
        """`text_cache` serves a frozen text encoder's outputs (refused for a trainable one);
        `channels_last` feeds the UNet channels_last inputs (convert its weights too)."""
        if settings.timestep_end > schedule.num_train_timesteps:
            raise ConfigError(
                f"timestep_end={settings.timestep_end} exceeds the scheduler's "
                f"num_train_timesteps={schedule.num_train_timesteps}."
            )
        self.unet = unet
        self.text_encoder = text_encoder
        self.vae = vae
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.schedule = schedule.to(self.device)
        self.settings = settings
        self.autocast_dtype = autocast_dtype
        if text_cache is not None and _requires_grad(text_encoder):
            raise ConfigError(
                "cache_text_encoder_outputs needs a frozen text encoder, but it trains; set "
                "disable_textenc_training: true (or freeze every layer with text_encoder_freezing)."
            )
        self.text_cache = text_cache
        self.channels_last = channels_last
        # Read from the VAE config, not hard-coded (ED2 uses 0.18215 whatever the VAE).
        # (`.config` is typed as a dict: attribute access on it works only at runtime.)
        self.scaling_factor = float(vae.config["scaling_factor"]) if vae is not None else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def encode_latents(self, pixel_values: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """VAE-encode images in [-1, 1] to scaled latents (float32), without gradients.

        With one generator per sample the latent is sampled from the VAE posterior (as ED2 does
        each step), each sample's posterior noise drawn from its own generator on the host;
        without generators the posterior mean is used, which is what a latent cache stores (a
        cache that stored one sample would freeze that sample's noise for the whole run).
        """
        if self.vae is None:
            raise ConfigError("batch has pixel_values but the training step was built without a VAE.")
        pixels = pixel_values.to(device=self.device, non_blocking=True).to(self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        if generators is None:
            latents = dist.mean
        else:
            if len(generators) != pixels.shape[0]:
                raise ValueError(f"{len(generators)} generators for a batch of {pixels.shape[0]} images")
            eps = torch.cat([torch.randn((1, *dist.mean.shape[1:]), generator=g) for g in generators])
            latents = dist.mean + dist.std * self._to_device(eps).to(dist.mean.dtype)
        # The VAE runs channels_last (placement.py); the UNet takes its own layout.
        return (latents.float() * self.scaling_factor).contiguous()

    def _encode_text(self, captions: list[str]) -> Tensor:
        # A trainable encoder keeps the caller's grad mode (validation and sampling run it under
        # no_grad and must build no graph); a frozen one never needs a graph.
        grad = contextlib.nullcontext() if _requires_grad(self.text_encoder) else torch.no_grad()
        with grad, self._autocast():
            return encode_captions(
                self.text_encoder,
                self.tokenizer,
                captions,
                clip_skip=self.settings.clip_skip,
                max_token_length=self.settings.max_token_length,
                device=self.device,
            )

    def fill_text_cache(self, captions: list[str]) -> int:
        """Encode `captions` into the text cache now (each as a miss would be), so the frozen
        text encoder is not needed again until samples; returns how many were encoded."""
        if self.text_cache is None:
            raise ValueError("fill_text_cache needs the step's text cache (cache_text_encoder_outputs)")
        return self.text_cache.fill(captions, self._encode_text)

    def _text_embeddings(self, captions: list[str], generators: list[torch.Generator]) -> Tensor:
        """Caption embeddings (from the text cache when there is one), each sample perturbed with
        noise from its own generator when embedding_perturbation > 0."""
        if self.text_cache is None:
            emb = self._encode_text(captions)
        else:
            emb = self.text_cache.encode(captions, self._encode_text)
        gamma = self.settings.embedding_perturbation
        if gamma == 0:
            return emb
        return torch.cat([perturb_embeddings(emb[i : i + 1], gamma, g) for i, g in enumerate(generators)])

    def __call__(self, batch: Batch) -> StepOutput:
        """Per-sample loss of `batch` (its latents or pixels, captions, loss scale and masks);
        each sample's draws come from its seed in `batch.sample_seeds`."""
        seeds = batch.sample_seeds
        gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        latents = self._latents(batch, gens)
        noise, timesteps = self._noise_and_timesteps(latents.shape[1:], gens)
        perturbation = None
        if self.settings.ip_noise_gamma > 0:
            shape = (1, *latents.shape[1:])
            perturbation = self._to_device(
                torch.cat([self._input_perturbation(shape, g, "cpu") for g in gens])
            )
        embeddings = self._text_embeddings(list(batch.captions), gens)
        return self._loss(batch, latents, noise, timesteps, embeddings, perturbation)

    def _latents(self, batch: Batch, generators: list[torch.Generator]) -> Tensor:
        """Batch latents: cached, or VAE-encoded with a posterior sample per sample."""
        if batch.latents is not None:
            return batch.latents.to(device=self.device, non_blocking=True).float()
        assert batch.pixel_values is not None  # a Batch holds one of the two
        return self.encode_latents(batch.pixel_values, generators)

    def _to_device(self, host: Tensor) -> Tensor:
        """One host-to-device copy; from pinned memory on CUDA, so it does not block the host."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _noise_and_timesteps(self, sample_shape, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Each sample's noise then timestep from its own generator, drawn on the host and moved
        in one copy (timesteps travel as float32 beside the noise: exact below 2**24)."""
        s = self.settings
        noise, steps = [], []
        for g in generators:
            noise.append(
                diffusion.sample_noise(
                    (1, *sample_shape),
                    generator=g,
                    device="cpu",
                    zero_frequency_noise_ratio=s.zero_frequency_noise_ratio,
                    pyramid_noise_discount=s.pyramid_noise_discount,
                    pyramid_iterations=s.pyramid_iterations,
                    offset_random_strength=s.noise_offset_random_strength,
                )
            )
            steps.append(
                diffusion.sample_timesteps(
                    1, start=s.timestep_start, end=s.timestep_end, generator=g, device="cpu"
                )
            )
        noise_host = torch.cat(noise)
        packed = self._to_device(torch.cat([noise_host.flatten(), torch.cat(steps).to(torch.float32)]))
        n = noise_host.numel()
        return packed[:n].view(noise_host.shape), packed[n:].long()

    def _input_perturbation(
        self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str
    ) -> Tensor:
        """ip_noise_gamma's extra input noise (the caller draws it only with ip_noise_gamma > 0):
        draw 4 of the documented order."""
        s = self.settings
        return diffusion.input_perturbation(
            tuple(shape),
            gamma=s.ip_noise_gamma,
            random_strength=s.ip_noise_gamma_random_strength,
            generator=generator,
            device=device,
        )

    def _loss(
        self,
        batch: Batch,
        latents: Tensor,
        noise: Tensor,
        timesteps: Tensor,
        embeddings: Tensor,
        perturbation: Tensor | None = None,
    ) -> StepOutput:
        s = self.settings

        # Input perturbation changes the model's input only; the target keeps the plain noise.
        input_noise = noise if perturbation is None else noise + perturbation
        noisy = diffusion.add_noise(self.schedule, latents, input_noise, timesteps)
        target = diffusion.prediction_target(self.schedule, latents, noise, timesteps)
        unet_dtype = next(self.unet.parameters()).dtype
        noisy = noisy.to(unet_dtype)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            pred = self.unet(noisy, timesteps, embeddings.to(unet_dtype)).sample

        per_sample = diffusion.per_sample_loss(
            pred,
            target,
            timesteps,
            loss_type=s.loss_type,
            num_train_timesteps=self.schedule.num_train_timesteps,
            weight_map=self._mask_weights(batch, latents) if s.masked_loss else None,
            normalize_weight_map=s.normalize_masked_area_loss,
        )
        weights = None
        if s.min_snr_gamma is not None:
            weights = diffusion.min_snr_weight(
                diffusion.snr(self.schedule, timesteps), s.min_snr_gamma, self.schedule.prediction_type
            )
        if s.debiased_estimation_loss:
            debiased = losses.debiased_weight(
                diffusion.snr(self.schedule, timesteps), self.schedule.prediction_type
            )
            weights = losses.combine_weights(weights, debiased)
        loss_scale = torch.as_tensor(batch.loss_scale).to(self.device, non_blocking=True)
        loss = diffusion.weighted_loss(per_sample, loss_scale=loss_scale, weights=weights)
        return StepOutput(loss=loss, timesteps=timesteps)

    def _mask_weights(self, batch: Batch, latents: Tensor) -> Tensor:
        """Per-latent-element loss weights from the batch's masks (masked_loss)."""
        if batch.masks is None:
            raise ValueError("masked_loss is on but the batch has no masks (build the loader with masks)")
        masks = batch.masks.to(device=self.device, non_blocking=True)
        size = (latents.shape[2], latents.shape[3])  # latents are (B, C, H, W)
        return losses.latent_weight_map(masks, size, self.settings.unmasked_weight)
