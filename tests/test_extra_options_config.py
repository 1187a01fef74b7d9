"""Validation of the kohya / OneTrainer keys (trainer/config/schema.py) and their start-up line."""

from __future__ import annotations

import pytest

from trainer.config import build_config
from trainer.config.summary import active_extra_options
from trainer.runtime.errors import ConfigError


def _cfg(**values):
    return build_config(values, {}, source="train.json")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mask_from_alpha": True}, "mask_from_alpha is true but does nothing without masked_loss"),
        ({"normalize_masked_area_loss": True}, "normalize_masked_area_loss is true but does nothing"),
        ({"unmasked_weight": 0.0}, "unmasked_weight 0.0 does nothing without masked_loss"),
        ({"masked_loss": True, "unmasked_weight": 1.5}, "key 'unmasked_weight' = 1.5"),
        ({"ip_noise_gamma_random_strength": True}, "does nothing without ip_noise_gamma"),
        ({"ip_noise_gamma": -0.1}, "key 'ip_noise_gamma' = -0.1"),
        (
            {"noise_offset_random_strength": True, "zero_frequency_noise_ratio": 0.0},
            "does nothing without zero_frequency_noise_ratio",
        ),
        ({"multires_noise_iterations": 0}, "key 'multires_noise_iterations' = 0"),
        ({"multires_noise_iterations": 6, "pyramid_noise_discount": 0.0}, "pyramid noise discount is 0"),
        ({"multires_noise_discount": 0.3, "pyramid_noise_discount": 0.4}, "two names of one setting"),
        ({"stop_text_encoder_training": 0}, "give optimizer steps (an integer >= 1)"),
        ({"stop_text_encoder_training": 1.5}, "write a step count as an integer"),
        ({"stop_text_encoder_training": True}, "key 'stop_text_encoder_training' = True"),
        ({"stop_text_encoder_training": 10, "disable_textenc_training": True}, "nothing to stop"),
        (
            {"stop_text_encoder_training": 10, "fused_back_pass": True},
            "cannot be combined with fused_back_pass",
        ),
        ({"save_precision": "fp16", "save_full_precision": True}, "contradicts save_full_precision"),
        ({"save_precision": "float"}, "key 'save_precision' = 'float'"),
        ({"caption_dropout_every_n_epochs": -1}, "key 'caption_dropout_every_n_epochs' = -1"),
        ({"save_every_n_steps": -2}, "key 'save_every_n_steps' = -2"),
    ],
)
def test_bad_values_and_combinations_are_refused_with_the_key(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(**values)


def test_stop_step_and_pyramid_discount_rules():
    assert _cfg(stop_text_encoder_training=0.25).text_encoder_stop_step(10) == 2  # round(2.5) = 2
    assert _cfg(stop_text_encoder_training=0.01).text_encoder_stop_step(10) == 1
    assert _cfg(stop_text_encoder_training=7).text_encoder_stop_step(10) == 7
    assert _cfg().text_encoder_stop_step(10) is None
    assert _cfg().pyramid_discount == 0.0
    assert _cfg(multires_noise_iterations=6).pyramid_discount == 0.3  # kohya's default discount
    assert _cfg(multires_noise_discount=0.2).pyramid_discount == 0.2
    assert _cfg(pyramid_noise_discount=0.4, multires_noise_discount=0.4).pyramid_discount == 0.4


def test_startup_line_names_the_active_options():
    assert active_extra_options(_cfg()) == []
    cfg = _cfg(
        masked_loss=True,
        mask_from_alpha=True,
        unmasked_weight=0.0,
        ip_noise_gamma=0.1,
        ip_noise_gamma_random_strength=True,
        multires_noise_iterations=4,
        stop_text_encoder_training=0.5,
        save_precision="bf16",
    )
    assert active_extra_options(cfg) == [
        "masked_loss (masks from alpha channel, unmasked_weight 0.0)",
        "ip_noise_gamma 0.1 (random strength)",
        "multires_noise_iterations 4 (discount 0.3)",
        "stop_text_encoder_training 0.5",
        "save_precision bf16",
    ]
