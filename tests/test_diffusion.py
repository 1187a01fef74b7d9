"""Closed-form checks of trainer/step/diffusion.py (schedule, noise, targets, SNR, losses)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from trainer.runtime.errors import ConfigError
from trainer.step import diffusion as D

SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture
def eps_schedule() -> D.NoiseSchedule:
    return D.NoiseSchedule.from_scheduler_config(SD_CONFIG)


# --- schedule ----------------------------------------------------------------------------------


def test_schedule_matches_diffusers_for_each_beta_schedule():
    for name in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        cfg = {**SD_CONFIG, "beta_schedule": name}
        sched = D.NoiseSchedule.from_scheduler_config(cfg)
        ref = DDPMScheduler(beta_schedule=name, beta_start=0.00085, beta_end=0.012)
        assert torch.equal(sched.betas, ref.betas), name
        assert torch.equal(sched.alphas_cumprod, ref.alphas_cumprod), name
        assert sched.num_train_timesteps == 1000
        assert sched.prediction_type == "epsilon"


def test_trained_betas_are_used():
    betas = torch.linspace(0.001, 0.05, 50).tolist()
    sched = D.NoiseSchedule.from_scheduler_config({"trained_betas": betas, "num_train_timesteps": 50})
    torch.testing.assert_close(sched.betas, torch.tensor(betas))
    assert sched.num_train_timesteps == 50


def test_ztsnr_betas_closed_form_properties():
    betas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas
    rescaled = D.rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1 - rescaled, 0)
    assert alphas_cumprod[-1].item() == 0.0  # exactly zero terminal SNR
    torch.testing.assert_close(rescaled[0], betas[0], rtol=1e-6, atol=0)  # first beta unchanged
    assert torch.all(alphas_cumprod[1:] <= alphas_cumprod[:-1])  # monotone
    assert rescaled[-1].item() == 1.0
    assert torch.all((rescaled > 0) & (rescaled <= 1))


def test_ztsnr_applied_before_alphas_cumprod_matches_diffusers():
    sched = D.NoiseSchedule.from_scheduler_config(SD_CONFIG, zero_terminal_snr=True)
    ref = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    )
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod, rtol=1e-4, atol=1e-6)
    assert sched.alphas_cumprod[-1].item() == 0.0
    plain = D.NoiseSchedule.from_scheduler_config(SD_CONFIG)
    assert plain.alphas_cumprod[-1].item() > 1e-3  # without ZTSNR the last step leaks signal


def test_prediction_type_override_alias_and_errors():
    assert D.NoiseSchedule.from_scheduler_config(
        SD_CONFIG, prediction_type="v-prediction"
    ).prediction_type == ("v_prediction")
    cfg_v = {**SD_CONFIG, "prediction_type": "v_prediction"}
    assert D.NoiseSchedule.from_scheduler_config(cfg_v).prediction_type == "v_prediction"
    assert (
        D.NoiseSchedule.from_scheduler_config(cfg_v, prediction_type="epsilon").prediction_type == "epsilon"
    )
    with pytest.raises(ConfigError, match="prediction_type"):
        D.NoiseSchedule.from_scheduler_config(SD_CONFIG, prediction_type="sample")
    with pytest.raises(ConfigError, match="prediction_type"):
        D.NoiseSchedule.from_scheduler_config({**SD_CONFIG, "prediction_type": "x0"})
    with pytest.raises(ConfigError, match="beta_schedule"):
        D.NoiseSchedule.from_scheduler_config({**SD_CONFIG, "beta_schedule": "cosine"})


# --- targets and SNR ---------------------------------------------------------------------------


def test_add_noise_and_targets_closed_form(eps_schedule):
    x0 = torch.randn(3, 4, 5, 5, generator=gen(1))
    eps = torch.randn(3, 4, 5, 5, generator=gen(2))
    t = torch.tensor([0, 500, 999])
    ab = eps_schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = D.add_noise(eps_schedule, x0, eps, t)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    assert torch.equal(D.prediction_target(eps_schedule, x0, eps, t), eps)

    v_sched = D.NoiseSchedule.from_scheduler_config(SD_CONFIG, prediction_type="v_prediction")
    v = D.prediction_target(v_sched, x0, eps, t)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)
    # v-parameterisation identities: x0 = sqrt(ab) x_t - sqrt(1-ab) v ; eps = sqrt(1-ab) x_t + sqrt(ab) v
    torch.testing.assert_close(ab.sqrt() * xt - (1 - ab).sqrt() * v, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((1 - ab).sqrt() * xt + ab.sqrt() * v, eps, rtol=1e-5, atol=1e-5)
    # and agree with diffusers' own implementation
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(xt, ref.add_noise(x0, eps, t))
    torch.testing.assert_close(v, ref.get_velocity(x0, eps, t))


def test_snr_values_and_ztsnr_terminal_is_safe(eps_schedule):
    t = torch.tensor([0, 250, 999])
    ab = eps_schedule.alphas_cumprod[t]
    torch.testing.assert_close(D.snr(eps_schedule, t), ab / (1 - ab))
    z = D.NoiseSchedule.from_scheduler_config(SD_CONFIG, zero_terminal_snr=True)
    s = D.snr(z, torch.tensor([999]))
    assert torch.isfinite(s).all() and s.item() == pytest.approx(D.SNR_FLOOR)
    assert D.min_snr_weight(s, 5.0, "epsilon").item() == pytest.approx(1.0)
    assert D.min_snr_weight(s, 5.0, "v_prediction").item() == pytest.approx(0.0, abs=1e-7)


def test_min_snr_weights_numbers():
    s = torch.tensor([0.5, 5.0, 20.0])
    eps_w = D.min_snr_weight(s, 5.0, "epsilon")
    v_w = D.min_snr_weight(s, 5.0, "v_prediction")
    torch.testing.assert_close(eps_w, torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(v_w, torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0]))
    torch.testing.assert_close(D.min_snr_weight(s, 5.0, "v-prediction"), v_w)
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        D.min_snr_weight(s, 0.0, "epsilon")


# --- timesteps and noise -----------------------------------------------------------------------


def test_timesteps_range_coverage_and_determinism():
    t = D.sample_timesteps(20000, start=100, end=200, generator=gen(3), device="cpu")
    assert t.dtype == torch.long and t.shape == (20000,)
    assert int(t.min()) == 100 and int(t.max()) == 199
    assert torch.unique(t).numel() == 100  # every value in [start, end) occurs
    assert torch.equal(t, D.sample_timesteps(20000, start=100, end=200, generator=gen(3), device="cpu"))
    with pytest.raises(AssertionError, match="timestep range"):  # train.json validation refuses it first
        D.sample_timesteps(4, start=500, end=500, generator=gen(), device="cpu")


def test_offset_noise_statistics():
    ratio = 0.5
    shape = (4000, 4, 8, 8)
    noise = D.sample_noise(shape, generator=gen(4), device="cpu", zero_frequency_noise_ratio=ratio)
    assert noise.var().item() == pytest.approx(1 + ratio**2, rel=0.02)
    channel_means = noise.mean(dim=(2, 3))
    assert channel_means.var().item() == pytest.approx(ratio**2 + 1 / 64, rel=0.05)
    plain = D.sample_noise(shape, generator=gen(4), device="cpu")
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 64, rel=0.05)
    # the base noise is drawn first, so the offset is exactly the difference
    offset = noise - plain
    torch.testing.assert_close(offset, offset[:, :, :1, :1].expand_as(offset))


def test_pyramid_noise_unit_std_and_low_frequency():
    shape = (8, 4, 64, 64)
    pyr = D.sample_noise(shape, generator=gen(5), device="cpu", pyramid_noise_discount=0.8)
    assert pyr.std().item() == pytest.approx(1.0, abs=1e-4)
    plain = D.sample_noise(shape, generator=gen(5), device="cpu")

    def neighbour_corr(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert neighbour_corr(plain) < 0.05
    assert neighbour_corr(pyr) > 0.15
    again = D.sample_noise(shape, generator=gen(5), device="cpu", pyramid_noise_discount=0.8)
    assert torch.equal(pyr, again)
    assert not torch.equal(
        pyr, D.sample_noise(shape, generator=gen(6), device="cpu", pyramid_noise_discount=0.8)
    )


# --- losses ------------------------------------------------------------------------------------


def _pred_target():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.full((2, 1, 2, 2), 3.0)  # |error| = 3: mse 9, huber(1) 2.5
    return pred, target


def test_plain_losses():
    pred, target = _pred_target()
    t = torch.tensor([0, 999])
    kw = {"num_train_timesteps": 1000}
    torch.testing.assert_close(
        D.per_sample_loss(pred, target, t, loss_type="mse", **kw), torch.tensor([9.0, 9.0])
    )
    torch.testing.assert_close(
        D.per_sample_loss(pred, target, t, loss_type="huber", **kw), torch.tensor([2.5, 2.5])
    )
    # smooth_l1 with beta = delta = 2: |e| - beta/2 = 2
    got = D.per_sample_loss(pred, target, t, loss_type="smooth_l1", huber_delta=2.0, **kw)
    torch.testing.assert_close(got, torch.tensor([2.0, 2.0]))
    with pytest.raises(ConfigError, match="loss_type"):
        D.per_sample_loss(pred, target, t, loss_type="l1", **kw)


def test_interpolated_losses_follow_the_documented_ends():
    pred, target = _pred_target()
    t = torch.tensor([0, 999])
    mse_huber = D.per_sample_loss(pred, target, t, loss_type="mse_huber", num_train_timesteps=1000)
    huber_mse = D.per_sample_loss(pred, target, t, loss_type="huber_mse", num_train_timesteps=1000)
    # mse_huber: pure MSE at t=0 (least noise), Huber at t=999 (most noise)
    assert mse_huber[0].item() == pytest.approx(9.0)
    assert mse_huber[1].item() == pytest.approx(0.001 * 9.0 + 0.999 * 2.5)
    # huber_mse: the reverse (this is what ED2's code computes for its "mse_huber")
    assert huber_mse[0].item() == pytest.approx(2.5)
    assert huber_mse[1].item() == pytest.approx(0.001 * 2.5 + 0.999 * 9.0)


def test_weighted_loss_applies_scale_and_weights():
    per = torch.tensor([1.0, 2.0, 3.0])
    out = D.weighted_loss(per, loss_scale=torch.tensor([1.0, 0.5, 2.0]), weights=None)
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 6.0]))
    out = D.weighted_loss(per, loss_scale=torch.ones(3), weights=torch.tensor([0.25, 1.0, 2.0]))
    torch.testing.assert_close(out, torch.tensor([0.25, 2.0, 6.0]))
    assert out.dtype == torch.float32
    assert math.isclose(float(out.sum()), 8.25)
