"""Closed forms of the kohya / OneTrainer loss and noise options (trainer/step/losses.py, diffusion.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import bundled_tokenizer, tiny_text_encoder

from tests.test_step import CAPTIONS
from trainer.data.batch import Batch
from trainer.step import diffusion, losses
from trainer.step.training_step import StepSettings, TrainingStep

SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_weight_is_inverse_sqrt_snr_capped_at_1000(prediction_type):
    schedule = diffusion.NoiseSchedule.from_scheduler_config(SD_SCHEDULE)
    t = torch.tensor([0, 1, 10, 500, 999])
    snr = diffusion.snr(schedule, t)
    assert snr[0] > 1000 and snr[2] < 1000  # t = 0 and 1 hit kohya's cap; the others do not
    ab = schedule.alphas_cumprod.double()[t]
    capped = torch.clamp(ab / (1 - ab), max=1000.0)
    expected = 1 / capped.sqrt() if prediction_type == "epsilon" else 1 / (capped + 1)
    weight = losses.debiased_weight(snr, prediction_type)
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=0)
    if prediction_type == "epsilon":
        assert weight[0].item() == pytest.approx(1 / math.sqrt(1000), rel=1e-6)


def test_input_perturbation_statistics_and_draw_order():
    shape = (4, 4, 64, 64)
    fixed = diffusion.input_perturbation(
        shape, gamma=0.1, random_strength=False, generator=torch.Generator().manual_seed(0), device="cpu"
    )
    assert fixed.std().item() == pytest.approx(0.1, rel=0.02) and abs(fixed.mean().item()) < 2e-3
    # Random strength: s = u * gamma with u ~ U(0, 1) drawn first, then the noise.
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    drawn = diffusion.input_perturbation(shape, gamma=0.1, random_strength=True, generator=g, device="cpu")
    u = torch.rand((), generator=ref)
    assert torch.equal(drawn, 0.1 * float(u) * torch.randn(shape, generator=ref))
    # Over many draws E[s^2] = gamma^2 / 3 (mean square of a uniform strength).
    g = torch.Generator().manual_seed(1)
    squares = [
        diffusion.input_perturbation(
            (1, 1, 32, 32), gamma=0.1, random_strength=True, generator=g, device="cpu"
        )
        .pow(2)
        .mean()
        .item()
        for _ in range(400)
    ]
    assert sum(squares) / len(squares) == pytest.approx(0.01 / 3, rel=0.1)


@pytest.mark.parametrize("iterations", [1, 3, 6])
def test_multires_noise_follows_its_formula(iterations):
    shape, discount = (2, 4, 32, 32), 0.3
    out = diffusion.pyramid_noise(
        shape,
        discount=discount,
        generator=torch.Generator().manual_seed(5),
        device="cpu",
        iterations=iterations,
    )
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(shape, generator=g)
    h, w = shape[2:]
    for i in range(iterations):
        r = float(torch.rand((), generator=g)) * 2 + 2
        h, w = max(1, int(h / r**i)), max(1, int(w / r**i))
        noise = (
            noise
            + F.interpolate(torch.randn(2, 4, h, w, generator=g), size=(32, 32), mode="bilinear")
            * discount**i
        )
        if h == 1 or w == 1:
            break
    assert torch.equal(out, noise / noise.std())


def test_noise_offset_random_strength_scales_the_offset_by_one_uniform_draw():
    shape = (3, 4, 8, 8)
    out = diffusion.sample_noise(
        shape,
        generator=torch.Generator().manual_seed(9),
        device="cpu",
        zero_frequency_noise_ratio=0.1,
        offset_random_strength=True,
    )
    g = torch.Generator().manual_seed(9)
    base = torch.randn(shape, generator=g)
    u = float(torch.rand((), generator=g))
    offset = torch.randn((3, 4, 1, 1), generator=g)
    assert torch.equal(out, base + (0.1 * u) * offset)
    # Off: the offset has the full ratio and no uniform is drawn (the stream is unchanged).
    plain = diffusion.sample_noise(
        shape, generator=torch.Generator().manual_seed(9), device="cpu", zero_frequency_noise_ratio=0.1
    )
    g = torch.Generator().manual_seed(9)
    base = torch.randn(shape, generator=g)
    assert torch.equal(plain, base + 0.1 * torch.randn((3, 4, 1, 1), generator=g))


def test_latent_weight_map_is_area_average_with_unmasked_floor():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1.0  # left half white
    mask[..., :4, 8:12] = 1.0  # a quarter of the top-right latent cell
    weights = losses.latent_weight_map(mask, (2, 2), unmasked_weight=0.1)
    assert torch.equal(weights, torch.tensor([[[[1.0, 0.25], [1.0, 0.1]]]]))
    ones = losses.latent_weight_map(torch.ones(2, 1, 64, 64), (8, 8), unmasked_weight=0.0)
    assert torch.equal(ones, torch.ones(2, 1, 8, 8))


def test_masked_mean_and_normalisation_closed_form():
    elementwise = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2)
    w = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    plain = losses.masked_mean(elementwise, w, normalize=False)
    expected0 = (0 * 1 + 1 * 0 + 2 * 0.5 + 3 * 0.5 + 4 * 1 + 5 * 0 + 6 * 0.5 + 7 * 0.5) / 8
    assert plain.tolist() == [pytest.approx(expected0), 0.0]
    normalized = losses.masked_mean(elementwise, w, normalize=True)
    assert normalized.tolist() == [pytest.approx(expected0 / 0.5), 0.0]  # all-zero weights: 0, not NaN


@pytest.mark.parametrize("loss_type", ["mse", "huber", "mse_huber"])
def test_all_ones_weight_map_is_bitwise_the_plain_loss(loss_type):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    kwargs = dict(loss_type=loss_type, num_train_timesteps=1000)
    plain = diffusion.per_sample_loss(pred, target, t, **kwargs)
    ones = losses.latent_weight_map(torch.ones(3, 1, 64, 64), (8, 8), unmasked_weight=0.1)
    for normalize in (False, True):
        masked = diffusion.per_sample_loss(
            pred, target, t, weight_map=ones, normalize_weight_map=normalize, **kwargs
        )
        assert torch.equal(masked, plain)


class RecordingZeroUNet(torch.nn.Module):
    """Predicts zeros (loss = the target's weighted mean square) and records its input."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, t, emb):
        self.inputs.append(x.detach().clone())
        return SimpleNamespace(sample=torch.zeros_like(x) * self.w)


def test_training_step_perturbs_the_input_only_and_weights_by_mask_and_debiasing():
    tok = bundled_tokenizer()
    te = tiny_text_encoder(1, vocab_size=len(tok), bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    unet = RecordingZeroUNet()
    schedule = diffusion.NoiseSchedule.from_scheduler_config(SD_SCHEDULE)
    settings = StepSettings(
        zero_frequency_noise_ratio=0.0,
        ip_noise_gamma=0.1,
        ip_noise_gamma_random_strength=True,
        debiased_estimation_loss=True,
        masked_loss=True,
        unmasked_weight=0.2,
        normalize_masked_area_loss=True,
    )
    step = TrainingStep(
        unet=unet,
        text_encoder=te,
        vae=None,
        tokenizer=tok,
        schedule=schedule,
        settings=settings,
        device="cpu",
    )
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 1, 64, 64)
    masks[..., :32] = 1.0  # left half
    batch = Batch(CAPTIONS, [4, 5], latents=latents, masks=masks)
    out = step(batch)

    draws = []  # each sample's own stream, in the documented order: noise, timestep, perturbation
    for seed in (4, 5):
        g = torch.Generator().manual_seed(seed)
        n = diffusion.sample_noise((1, 4, 8, 8), generator=g, device="cpu")
        ts = diffusion.sample_timesteps(1, start=0, end=1000, generator=g, device="cpu")
        p = diffusion.input_perturbation(
            (1, 4, 8, 8), gamma=0.1, random_strength=True, generator=g, device="cpu"
        )
        draws.append((n, ts, p))
    noise, t, perturbation = (torch.cat(parts) for parts in zip(*draws, strict=True))
    assert torch.equal(out.timesteps, t)
    assert torch.equal(unet.inputs[0], diffusion.add_noise(schedule, latents, noise + perturbation, t))
    weights = torch.full((2, 1, 8, 8), 0.2)
    weights[..., :4] = 1.0
    per_sample = (noise.pow(2) * weights).mean(dim=(1, 2, 3)) / weights.mean(
        dim=(1, 2, 3)
    )  # target: plain noise
    snr = diffusion.snr(schedule, t)
    torch.testing.assert_close(out.loss, per_sample / snr.clamp(max=1000).sqrt(), rtol=1e-6, atol=0)
