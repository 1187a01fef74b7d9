"""Pure tensor maths of denoising-diffusion training: schedule, noise, targets, SNR, losses.

Nothing here holds state or does I/O. Every random draw takes an explicit `torch.Generator`:
tensors are drawn on the generator's device and then moved to the requested device, so a CPU
generator gives bitwise the same numbers whether the model runs on CPU or GPU, and its state
(`generator.get_state()`) is all a resume needs. See docs/TRAINING_STEP.md for the formulas and
for where this differs from EveryDream2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler  # not `diffusers`: mypy sees a dummy there
from torch import Tensor

from trainer.runtime.errors import ConfigError
from trainer.step.losses import masked_mean

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
_PREDICTION_ALIASES = {"epsilon": "epsilon", "v_prediction": "v_prediction", "v-prediction": "v_prediction"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
LOSS_TYPES = ("mse", "huber", "smooth_l1", "mse_huber", "huber_mse")

# Smallest SNR used in divisions. With zero terminal SNR the last timestep has alpha_bar == 0,
# hence SNR == 0; the clamp keeps min-SNR weights finite (epsilon weight -> 1, v weight -> 0).
SNR_FLOOR = 1e-8


def normalize_prediction_type(value: str, *, source: str = "prediction_type") -> str:
    """Map "epsilon" / "v_prediction" / "v-prediction" to the canonical name, else ConfigError."""
    canonical = _PREDICTION_ALIASES.get(str(value).strip().lower())
    if canonical is None:
        raise ConfigError(
            f"{source}: unsupported prediction_type {value!r}; use one of "
            f'{", ".join(PREDICTION_TYPES)} ("v-prediction" is accepted as an alias).'
        )
    return canonical


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward-process schedule: betas and alpha_bar (`alphas_cumprod`) per timestep."""

    betas: Tensor
    alphas_cumprod: Tensor
    num_train_timesteps: int
    prediction_type: str

    @classmethod
    def from_scheduler_config(
        cls,
        config: dict,
        *,
        zero_terminal_snr: bool = False,
        prediction_type: str | None = None,
    ) -> NoiseSchedule:
        """Build the schedule from a diffusers `scheduler_config.json` dict (any scheduler class).

        Betas come from diffusers' DDPMScheduler (linear, scaled_linear, squaredcos_cap_v2 or
        `trained_betas`), so they match what inference pipelines use. With `zero_terminal_snr`
        (or `rescale_betas_zero_snr` in the config) the betas are rescaled *before* alpha_bar is
        derived, as in arXiv 2305.08891. `prediction_type` overrides the config's value.
        """
        schedule_name = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is None and schedule_name not in BETA_SCHEDULES:
            raise ConfigError(
                f"scheduler config: beta_schedule {schedule_name!r} is not supported; "
                f"use one of {', '.join(BETA_SCHEDULES)} or give trained_betas."
            )
        if prediction_type is not None:
            pred = normalize_prediction_type(prediction_type, source="prediction_type override")
        else:
            pred = normalize_prediction_type(
                config.get("prediction_type", "epsilon"), source="scheduler config prediction_type"
            )
        ddpm = DDPMScheduler(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=schedule_name,
            trained_betas=config.get("trained_betas"),
        )
        betas = ddpm.betas.to(torch.float32)
        if zero_terminal_snr or config.get("rescale_betas_zero_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            num_train_timesteps=int(betas.shape[0]),
            prediction_type=pred,
        )

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """A copy whose tensors live on `device` (so indexing by timesteps needs no transfer)."""
        return NoiseSchedule(
            betas=self.betas.to(device),
            alphas_cumprod=self.alphas_cumprod.to(device),
            num_train_timesteps=self.num_train_timesteps,
            prediction_type=self.prediction_type,
        )


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last timestep has SNR exactly 0 (arXiv 2305.08891, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is
    unchanged; the result is converted back to betas. Without this, the final timestep still
    leaks the image's mean, and the model cannot learn to produce very dark/bright images.
    """
    # float64 inside so the first beta survives the shift-and-scale to ~1e-12, not ~1e-5.
    alphas_bar_sqrt = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def _draw_randn(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str, dtype: torch.dtype
) -> Tensor:
    """Standard normal drawn on the generator's device (float32), then moved/cast."""
    sample = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return sample.to(device=device, dtype=dtype)


def sample_timesteps(
    n: int, *, start: int, end: int, generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """`n` timesteps drawn uniformly from the integers in [start, end) (end exclusive, as ED2)."""
    assert 0 <= start < end, f"timestep range [{start}, {end}) (train.json validation refuses it)"
    t = torch.randint(start, end, (n,), generator=generator, device=generator.device, dtype=torch.long)
    return t.to(device)


PYRAMID_LEVELS = 10  # EveryDream2's fixed count; kohya's multires_noise_iterations sets it


def pyramid_noise(
    shape: tuple[int, ...],
    *,
    discount: float,
    generator: torch.Generator,
    device: torch.device | str,
    iterations: int = PYRAMID_LEVELS,
) -> Tensor:
    """Multi-resolution ("pyramid") noise with unit std, ED2's `pyramid_noise_like` rule.

    Starting from N(0,1), up to `iterations` levels (ED2: 10; kohya's multires_noise_iterations)
    of bilinearly upsampled noise are added with weight discount**i; at each level the
    resolution is divided by r**i with r ~ U[2, 4) drawn from `generator` (ED2 and kohya use
    Python's global `random`; the compounding of the divisions is kept). The loop stops early
    once a side reaches 1 pixel. The sum is divided by its own std (over the whole batch).
    """
    b, c, h, w = shape
    noise = _draw_randn(shape, generator, device, torch.float32)
    for i in range(iterations):
        r = float(torch.rand((), generator=generator, device=generator.device)) * 2 + 2
        h, w = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        level = _draw_randn((b, c, h, w), generator, device, torch.float32)
        noise = noise + F.interpolate(level, size=shape[2:], mode="bilinear") * discount**i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def sample_noise(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    zero_frequency_noise_ratio: float = 0.0,
    pyramid_noise_discount: float = 0.0,
    pyramid_iterations: int = PYRAMID_LEVELS,
    offset_random_strength: bool = False,
) -> Tensor:
    """Training noise for latents of `shape` (B, C, H, W).

    Order of draws (fixed): the base/pyramid noise, then (with `offset_random_strength`) one
    U(0,1) strength, then the offset noise. Pyramid noise is used when
    `pyramid_noise_discount > 0`; offset noise ("zero-frequency", Guttenberg 2023) adds
    `ratio * N(0,1)` per (sample, channel) when `zero_frequency_noise_ratio > 0`, which raises
    each element's variance to 1 + ratio**2. With `offset_random_strength` (kohya's
    noise_offset_random_strength) the ratio is `u * ratio`, u ~ U(0,1) once per call (kohya:
    once per batch; the training step calls this once per sample).
    """
    if zero_frequency_noise_ratio < 0:
        raise ConfigError(f"zero_frequency_noise_ratio={zero_frequency_noise_ratio}: must be >= 0.")
    if pyramid_noise_discount < 0:
        raise ConfigError(f"pyramid_noise_discount={pyramid_noise_discount}: must be >= 0.")
    if pyramid_noise_discount > 0:
        noise = pyramid_noise(
            shape,
            discount=pyramid_noise_discount,
            generator=generator,
            device=device,
            iterations=pyramid_iterations,
        )
    else:
        noise = _draw_randn(shape, generator, device, torch.float32)
    if zero_frequency_noise_ratio > 0:
        ratio = zero_frequency_noise_ratio
        if offset_random_strength:
            ratio = ratio * float(torch.rand((), generator=generator, device=generator.device))
        offset = _draw_randn((shape[0], shape[1], 1, 1), generator, device, torch.float32)
        noise = noise + ratio * offset
    return noise.to(dtype)


def input_perturbation(
    shape: tuple[int, ...],
    *,
    gamma: float,
    random_strength: bool,
    generator: torch.Generator,
    device: torch.device | str,
) -> Tensor:
    """Input perturbation (Ning et al. 2023, arXiv 2301.11706; kohya's ip_noise_gamma): the
    extra noise `s * N(0,1)` added to the noise that makes x_t, not to the target, so the model
    learns from inputs slightly off the forward process (it meets such inputs when sampling).

    s = gamma, or with `random_strength` s = u * gamma, u ~ U(0,1) drawn first (kohya: once per
    batch; here once per call, i.e. per sample). Each element's variance is s**2.
    """
    strength = gamma
    if random_strength:
        strength = gamma * float(torch.rand((), generator=generator, device=generator.device))
    return strength * _draw_randn(shape, generator, device, torch.float32)


def _coefficients(schedule: NoiseSchedule, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped (B, 1, 1, ...) like `like`."""
    alpha_bar = schedule.alphas_cumprod.to(timesteps.device)[timesteps].to(device=like.device)
    shape = (-1,) + (1,) * (like.ndim - 1)
    sqrt_ab = alpha_bar.sqrt().to(like.dtype).reshape(shape)
    sqrt_one_minus_ab = (1.0 - alpha_bar).sqrt().to(like.dtype).reshape(shape)
    return sqrt_ab, sqrt_one_minus_ab


def add_noise(schedule: NoiseSchedule, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps."""
    sqrt_ab, sqrt_one_minus_ab = _coefficients(schedule, timesteps, latents)
    return sqrt_ab * latents + sqrt_one_minus_ab * noise


def prediction_target(schedule: NoiseSchedule, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet must predict: eps, or v = sqrt(alpha_bar)*eps - sqrt(1-alpha_bar)*x0."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        sqrt_ab, sqrt_one_minus_ab = _coefficients(schedule, timesteps, latents)
        return sqrt_ab * noise - sqrt_one_minus_ab * latents
    raise ConfigError(
        f"prediction_type {schedule.prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}."
    )


def snr(schedule: NoiseSchedule, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per timestep (float32, >= SNR_FLOOR)."""
    alpha_bar = schedule.alphas_cumprod.to(timesteps.device)[timesteps].to(torch.float32)
    return (alpha_bar / (1.0 - alpha_bar)).clamp(min=SNR_FLOOR)


def min_snr_weight(snr_values: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weight (arXiv 2303.09556), per sample.

    epsilon: min(SNR, gamma) / SNR.  v_prediction: min(SNR, gamma) / (SNR + 1) — the v loss
    already carries a factor (SNR + 1) relative to the x0 loss, so using the epsilon formula
    (as ED2 does) over-weights low-noise steps.
    """
    if gamma <= 0:
        raise ConfigError(f"min_snr_gamma={gamma}: must be > 0 (leave it unset to disable min-SNR).")
    pred = normalize_prediction_type(prediction_type)
    s = snr_values.to(torch.float32).clamp(min=SNR_FLOOR)
    clipped = torch.clamp(s, max=gamma)
    if pred == "epsilon":
        return clipped / s
    return clipped / (s + 1.0)


def per_sample_loss(
    pred: Tensor,
    target: Tensor,
    timesteps: Tensor,
    *,
    loss_type: str,
    num_train_timesteps: int,
    huber_delta: float = 1.0,
    weight_map: Tensor | None = None,
    normalize_weight_map: bool = False,
) -> Tensor:
    """Element-wise loss averaged over all but the batch dimension -> shape [B], float32.

    mse / huber (delta) / smooth_l1 (beta = delta) are the plain losses. The interpolated ones
    use b = t / num_train_timesteps (0 at the cleanest step, ~1 at the noisiest), and the name
    reads from low to high noise:
      mse_huber = (1 - b) * MSE + b * Huber   -> MSE at t=0, Huber at t=999
      huber_mse = (1 - b) * Huber + b * MSE   -> Huber at t=0, MSE at t=999
    ED2's *code* does the opposite of its docs for both names; ED2's actual `mse_huber` is
    this `huber_mse` (see docs/TRAINING_STEP.md).

    `weight_map` (masked loss, trainer/step/losses.py) multiplies the element-wise loss before the
    mean; `normalize_weight_map` then divides each sample by its map's mean (OneTrainer's
    normalize_masked_area_loss).
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type {loss_type!r} is not supported; use one of {', '.join(LOSS_TYPES)}.")
    pred = pred.float()
    target = target.float()
    dims = tuple(range(1, pred.ndim))

    def reduce(elementwise: Tensor) -> Tensor:
        if weight_map is None:
            return elementwise.mean(dim=dims)
        return masked_mean(elementwise, weight_map, normalize=normalize_weight_map)

    if loss_type == "mse":
        return reduce(F.mse_loss(pred, target, reduction="none"))
    if loss_type == "huber":
        return reduce(F.huber_loss(pred, target, reduction="none", delta=huber_delta))
    if loss_type == "smooth_l1":
        return reduce(F.smooth_l1_loss(pred, target, reduction="none", beta=huber_delta))
    mse = reduce(F.mse_loss(pred, target, reduction="none"))
    huber = reduce(F.huber_loss(pred, target, reduction="none", delta=huber_delta))
    b = timesteps.to(device=mse.device, dtype=torch.float32) / float(num_train_timesteps)
    if loss_type == "mse_huber":
        return (1.0 - b) * mse + b * huber
    return (1.0 - b) * huber + b * mse


def weighted_loss(per_sample: Tensor, *, loss_scale: Tensor, weights: Tensor | None) -> Tensor:
    """per_sample * loss_scale (dataset `loss_scale.txt`) * weights (e.g. min-SNR) -> [B] float32."""
    out = per_sample.float() * loss_scale.to(device=per_sample.device, dtype=torch.float32)
    if weights is not None:
        out = out * weights.to(device=per_sample.device, dtype=torch.float32)
    return out
