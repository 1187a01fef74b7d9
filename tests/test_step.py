"""trainer/step.py: one micro-batch with tiny diffusers/transformers models on CPU."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import bundled_tokenizer, tiny_text_encoder, tiny_unet
from torch import nn

from trainer import diffusion as D
from trainer.errors import ConfigError
from trainer.step import StepSettings, TrainingStep
from trainer.text import encode_captions

SCHED_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
CAPTIONS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tok = bundled_tokenizer()
    te = tiny_text_encoder(
        2, seed=None, vocab_size=len(tok), bos_token_id=49406, eos_token_id=49407, pad_token_id=1
    )
    unet = tiny_unet(seed=None, attention_head_dim=4)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
    )
    vae.requires_grad_(False)
    return SimpleNamespace(tok=tok, te=te, unet=unet, vae=vae)


def make_step(models, *, unet=None, prediction_type=None, **settings) -> TrainingStep:
    schedule = D.NoiseSchedule.from_scheduler_config(SCHED_CONFIG, prediction_type=prediction_type)
    return TrainingStep(
        unet=unet or models.unet,
        text_encoder=models.te,
        vae=models.vae,
        tokenizer=models.tok,
        schedule=schedule,
        settings=StepSettings(**settings),
        device="cpu",
    )


def pixel_batch(bsz: int = 2) -> dict:
    px = torch.rand(bsz, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    return {"pixel_values": px, "captions": CAPTIONS[:bsz], "loss_scale": torch.ones(bsz)}


class ZeroUNet(nn.Module):
    """Predicts zeros, so the loss is exactly the target's mean square."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, emb):
        return SimpleNamespace(sample=torch.zeros_like(x) * self.w)


def test_deterministic_for_same_generator_state(models):
    step = make_step(
        models, zero_frequency_noise_ratio=0.1, pyramid_noise_discount=0.5, embedding_perturbation=0.1
    )
    a = step(pixel_batch(), torch.Generator().manual_seed(1))
    b = step(pixel_batch(), torch.Generator().manual_seed(1))
    c = step(pixel_batch(), torch.Generator().manual_seed(2))
    assert a.loss.shape == (2,) and a.loss.dtype == torch.float32 and a.loss.requires_grad
    assert torch.equal(a.loss, b.loss) and torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(a.loss, c.loss)
    # resuming from a saved generator state continues the same stream
    g = torch.Generator().manual_seed(3)
    step(pixel_batch(), g)
    saved = g.get_state()
    nxt = step(pixel_batch(), g)
    g2 = torch.Generator()
    g2.set_state(saved)
    assert torch.equal(step(pixel_batch(), g2).loss, nxt.loss)


def reference_draws(step: TrainingStep, batch: dict, seed: int, s: StepSettings):
    """Re-do the documented RNG order by hand: latent sample, noise, timesteps."""
    g = torch.Generator().manual_seed(seed)
    latents = step.encode_latents(batch["pixel_values"], g)
    noise = D.sample_noise(
        tuple(latents.shape),
        generator=g,
        device="cpu",
        zero_frequency_noise_ratio=s.zero_frequency_noise_ratio,
        pyramid_noise_discount=s.pyramid_noise_discount,
    )
    t = D.sample_timesteps(
        latents.shape[0], start=s.timestep_start, end=s.timestep_end, generator=g, device="cpu"
    )
    return latents, noise, t


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """SD's scaled_linear schedule in closed form (float64): betas evenly spaced in sqrt."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_matches_prediction_type(models, prediction_type):
    step = make_step(
        models, unet=ZeroUNet(), prediction_type=prediction_type, zero_frequency_noise_ratio=0.05
    )
    batch = pixel_batch()
    out = step(batch, torch.Generator().manual_seed(5))
    latents, noise, t = reference_draws(step, batch, 5, step.settings)
    assert torch.equal(out.timesteps, t)
    if prediction_type == "epsilon":
        target = noise.double()
    else:  # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0
        target = alpha_bar(t).sqrt() * noise.double() - (1 - alpha_bar(t)).sqrt() * latents.double()
    torch.testing.assert_close(out.loss.double(), target.pow(2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)


def test_min_snr_and_loss_scale_are_applied(models):
    batch = pixel_batch()
    batch["loss_scale"] = torch.tensor([1.0, 3.0])
    step = make_step(models, unet=ZeroUNet(), prediction_type="v_prediction", min_snr_gamma=5.0)
    out = step(batch, torch.Generator().manual_seed(6))
    latents, noise, t = reference_draws(step, batch, 6, step.settings)
    ab = alpha_bar(t)
    v = ab.sqrt() * noise.double() - (1 - ab).sqrt() * latents.double()
    snr = (ab / (1 - ab)).flatten()
    weight = torch.clamp(snr, max=5.0) / (snr + 1)  # min-SNR-gamma for v-prediction
    expected = v.pow(2).mean(dim=(1, 2, 3)) * weight * torch.tensor([1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_vae_scaling_factor_from_config_and_cached_latents(models):
    step = make_step(models, unet=ZeroUNet())
    assert step.scaling_factor == 0.5
    px = pixel_batch()["pixel_values"]
    with torch.no_grad():
        mean = models.vae.encode(px).latent_dist.mean
    torch.testing.assert_close(step.encode_latents(px), mean * 0.5)
    # a batch with cached latents skips the VAE draw: noise comes first from the generator
    latents = torch.randn(2, 4, 8, 8)
    out = step(
        {"latents": latents, "captions": CAPTIONS, "loss_scale": torch.ones(2)},
        torch.Generator().manual_seed(7),
    )
    g = torch.Generator().manual_seed(7)
    noise = D.sample_noise((2, 4, 8, 8), generator=g, device="cpu")
    t = D.sample_timesteps(2, start=0, end=1000, generator=g, device="cpu")
    assert torch.equal(out.timesteps, t)
    torch.testing.assert_close(out.loss, noise.pow(2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("train_te", [False, True])
def test_gradients_reach_text_encoder_only_when_it_trains(models, train_te):
    models.te.requires_grad_(train_te)
    models.unet.zero_grad(set_to_none=True)
    models.te.zero_grad(set_to_none=True)
    try:
        step = make_step(models, clip_skip=2)
        out = step(pixel_batch(), torch.Generator().manual_seed(8))
        out.loss.mean().backward()
        assert all(p.grad is not None for p in models.unet.parameters() if p.requires_grad)
        te_grads = [p.grad for p in models.te.parameters()]
        if train_te:
            assert any(g is not None and g.abs().sum() > 0 for g in te_grads)
        else:
            assert all(g is None for g in te_grads)
        assert all(p.grad is None for p in models.vae.parameters())
    finally:
        models.te.requires_grad_(True)
        models.unet.zero_grad(set_to_none=True)
        models.te.zero_grad(set_to_none=True)


def test_embeddings_follow_settings(models):
    """The UNet sees encode_captions(...) with the configured clip_skip / token budget."""
    seen = {}

    class Spy(ZeroUNet):
        def forward(self, x, t, emb):
            seen["emb"] = emb
            return super().forward(x, t, emb)

    long = " ".join(["tree"] * 100)
    step = make_step(models, unet=Spy(), clip_skip=2, max_token_length=150)
    step(
        {"latents": torch.zeros(1, 4, 8, 8), "captions": [long], "loss_scale": torch.ones(1)},
        torch.Generator(),
    )
    with torch.no_grad():
        expected = encode_captions(
            models.te, models.tok, [long], clip_skip=2, max_token_length=150, device="cpu"
        )
    assert seen["emb"].shape == (1, 154, 32)
    torch.testing.assert_close(seen["emb"], expected)


def test_autocast_bf16_gives_fp32_loss(models):
    schedule = D.NoiseSchedule.from_scheduler_config(SCHED_CONFIG)
    step = TrainingStep(
        unet=models.unet,
        text_encoder=models.te,
        vae=models.vae,
        tokenizer=models.tok,
        schedule=schedule,
        settings=StepSettings(loss_type="mse_huber"),
        device="cpu",
        autocast_dtype=torch.bfloat16,
    )
    out = step(pixel_batch(), torch.Generator().manual_seed(0))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss).all()


def test_settings_validation(models):
    with pytest.raises(ConfigError, match="timestep_start"):
        StepSettings(timestep_start=600, timestep_end=500)
    with pytest.raises(ConfigError, match="loss_type"):
        StepSettings(loss_type="l1")
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        StepSettings(min_snr_gamma=0)
    with pytest.raises(ConfigError, match="timestep_end"):
        make_step(models, timestep_end=2000)
