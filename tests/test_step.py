"""trainer/step/training_step.py: one micro-batch with tiny diffusers/transformers models on CPU."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import bundled_tokenizer, tiny_text_encoder, tiny_unet
from torch import nn

from trainer.data.batch import Batch
from trainer.runtime.errors import ConfigError
from trainer.step import diffusion as D
from trainer.step.text import encode_captions
from trainer.step.training_step import StepSettings, TrainingStep

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


def pixel_batch(bsz: int = 2, seeds: tuple[int, ...] = (11, 12)) -> Batch:
    px = torch.rand(bsz, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    return Batch(CAPTIONS[:bsz], list(seeds[:bsz]), pixel_values=px)


class ZeroUNet(nn.Module):
    """Predicts zeros, so the loss is exactly the target's mean square."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, emb):
        return SimpleNamespace(sample=torch.zeros_like(x) * self.w)


def test_deterministic_for_the_same_sample_seeds(models):
    step = make_step(
        models, zero_frequency_noise_ratio=0.1, pyramid_noise_discount=0.5, embedding_perturbation=0.1
    )
    a = step(pixel_batch(seeds=(1, 2)))
    b = step(pixel_batch(seeds=(1, 2)))
    c = step(pixel_batch(seeds=(1, 3)))
    assert a.loss.shape == (2,) and a.loss.dtype == torch.float32 and a.loss.requires_grad
    assert torch.equal(a.loss, b.loss) and torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(a.loss[1], c.loss[1])


def test_a_batch_without_sample_seeds_is_refused(models):
    """The seeds are the only source of the step's randomness: no silent fallback stream."""
    px = pixel_batch().pixel_values
    with pytest.raises(TypeError, match="sample_seeds"):
        Batch(CAPTIONS, pixel_values=px)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="sample seeds"):
        Batch(CAPTIONS, [7], pixel_values=px)  # one seed for two samples


def test_a_samples_draws_depend_on_its_seed_only_whatever_the_batch(models, monkeypatch):
    """Same seed -> same posterior sample, noise, timestep and perturbation, whichever batch
    (size, position, neighbours) the sample is in: what makes 1 process == N processes."""
    step = make_step(
        models, zero_frequency_noise_ratio=0.1, pyramid_noise_discount=0.5, embedding_perturbation=0.1
    )
    seen = []
    monkeypatch.setattr(
        step, "_loss", lambda batch, lat, noise, t, emb, perturbation=None: seen.append((lat, noise, t, emb))
    )
    px = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    captions = ["a photo of a cat", "a red car", "a green tree"]
    step(Batch(captions, [7, 8, 9], pixel_values=px))
    step(Batch(captions[2:0:-1], [9, 8], pixel_values=px[[2, 1]]))
    step(Batch(captions[1:2], [8], pixel_values=px[1:2]))
    (lat3, noise3, t3, emb3), (lat2, noise2, t2, emb2), (lat1, noise1, t1, emb1) = seen
    for i, j in ((2, 0), (1, 1)):  # batch of 3 index i == batch of 2 index j
        assert torch.equal(noise3[i], noise2[j]) and t3[i] == t2[j]
        torch.testing.assert_close(lat3[i], lat2[j], rtol=1e-5, atol=1e-6)  # batched convolutions
        torch.testing.assert_close(emb3[i], emb2[j], rtol=1e-5, atol=1e-6)
    assert torch.equal(noise3[1], noise1[0]) and t3[1] == t1[0]
    torch.testing.assert_close(lat3[1], lat1[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(noise3[0], noise3[1])


def reference_draws(step: TrainingStep, batch: Batch, s: StepSettings):
    """Re-do the documented RNG order by hand, one generator per sample seed: latent sample,
    noise, timestep."""
    gens = [torch.Generator().manual_seed(seed) for seed in batch.sample_seeds]
    latents = step.encode_latents(batch.pixel_values, gens)
    noise = torch.cat(
        [
            D.sample_noise(
                (1, *latents.shape[1:]),
                generator=g,
                device="cpu",
                zero_frequency_noise_ratio=s.zero_frequency_noise_ratio,
                pyramid_noise_discount=s.pyramid_noise_discount,
            )
            for g in gens
        ]
    )
    t = torch.cat(
        [
            D.sample_timesteps(1, start=s.timestep_start, end=s.timestep_end, generator=g, device="cpu")
            for g in gens
        ]
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
    out = step(batch)
    latents, noise, t = reference_draws(step, batch, step.settings)
    assert torch.equal(out.timesteps, t)
    if prediction_type == "epsilon":
        target = noise.double()
    else:  # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0
        target = alpha_bar(t).sqrt() * noise.double() - (1 - alpha_bar(t)).sqrt() * latents.double()
    torch.testing.assert_close(out.loss.double(), target.pow(2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)


def test_min_snr_and_loss_scale_are_applied(models):
    batch = pixel_batch()
    batch.loss_scale = torch.tensor([1.0, 3.0])
    step = make_step(models, unet=ZeroUNet(), prediction_type="v_prediction", min_snr_gamma=5.0)
    out = step(batch)
    latents, noise, t = reference_draws(step, batch, step.settings)
    ab = alpha_bar(t)
    v = ab.sqrt() * noise.double() - (1 - ab).sqrt() * latents.double()
    snr = (ab / (1 - ab)).flatten()
    weight = torch.clamp(snr, max=5.0) / (snr + 1)  # min-SNR-gamma for v-prediction
    expected = v.pow(2).mean(dim=(1, 2, 3)) * weight * torch.tensor([1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_vae_scaling_factor_from_config_and_cached_latents(models):
    step = make_step(models, unet=ZeroUNet())
    assert step.scaling_factor == 0.5
    px = pixel_batch().pixel_values
    with torch.no_grad():
        mean = models.vae.encode(px).latent_dist.mean
    torch.testing.assert_close(step.encode_latents(px), mean * 0.5)
    # a batch with cached latents skips the VAE draw: noise comes first from each generator
    latents = torch.randn(2, 4, 8, 8)
    out = step(Batch(CAPTIONS, [7, 8], latents=latents))
    gens = [torch.Generator().manual_seed(seed) for seed in (7, 8)]
    noise = torch.cat([D.sample_noise((1, 4, 8, 8), generator=g, device="cpu") for g in gens])
    t = torch.cat([D.sample_timesteps(1, start=0, end=1000, generator=g, device="cpu") for g in gens])
    assert torch.equal(out.timesteps, t)
    torch.testing.assert_close(out.loss, noise.pow(2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("train_te", [False, True])
def test_gradients_reach_text_encoder_only_when_it_trains(models, train_te):
    models.te.requires_grad_(train_te)
    models.unet.zero_grad(set_to_none=True)
    models.te.zero_grad(set_to_none=True)
    try:
        step = make_step(models, clip_skip=2)
        out = step(pixel_batch())
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
    step(Batch([long], [0], latents=torch.zeros(1, 4, 8, 8)))
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
    out = step(pixel_batch())
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss).all()


def test_settings_validation(models):
    """Key ranges are train.json's to refuse (test_config); the step asserts them. What only the
    loaded model can tell (its scheduler's length) is a ConfigError here."""
    with pytest.raises(AssertionError):
        StepSettings(timestep_start=600, timestep_end=500)
    with pytest.raises(AssertionError):
        StepSettings(loss_type="l1")
    with pytest.raises(AssertionError):
        StepSettings(min_snr_gamma=0)
    with pytest.raises(ConfigError, match="timestep_end"):
        make_step(models, timestep_end=2000)
