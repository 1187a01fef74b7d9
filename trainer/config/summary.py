"""The start-up summary of the options users bring from kohya and OneTrainer (the rules between
keys are TrainConfig's validators, trainer/config/schema.py)."""

from __future__ import annotations

from trainer.config.schema import TrainConfig


def active_extra_options(cfg: TrainConfig) -> list[str]:
    """The kohya/OneTrainer options this run uses, for the start-up summary (empty = none)."""
    out = []
    if cfg.masked_loss:
        source = "alpha channel" if cfg.mask_from_alpha else "-masklabel.png files"
        norm = ", normalized by area" if cfg.normalize_masked_area_loss else ""
        out.append(f"masked_loss (masks from {source}, unmasked_weight {cfg.unmasked_weight}{norm})")
    if cfg.debiased_estimation_loss:
        out.append("debiased_estimation_loss")
    if cfg.ip_noise_gamma:
        out.append(
            f"ip_noise_gamma {cfg.ip_noise_gamma}{' (random strength)' if cfg.ip_noise_gamma_random_strength else ''}"
        )
    if cfg.noise_offset_random_strength:
        out.append(f"noise_offset_random_strength (0..{cfg.zero_frequency_noise_ratio})")
    if cfg.multires_noise_iterations is not None:
        out.append(
            f"multires_noise_iterations {cfg.multires_noise_iterations} (discount {cfg.pyramid_discount})"
        )
    if cfg.caption_dropout_every_n_epochs:
        out.append(f"caption_dropout_every_n_epochs {cfg.caption_dropout_every_n_epochs}")
    if cfg.keep_tokens_separator:
        out.append(f"keep_tokens_separator {cfg.keep_tokens_separator!r}")
    if cfg.stop_text_encoder_training is not None:
        out.append(f"stop_text_encoder_training {cfg.stop_text_encoder_training}")
    if cfg.save_every_n_steps:
        out.append(f"save_every_n_steps {cfg.save_every_n_steps}")
    if cfg.save_precision is not None:
        out.append(f"save_precision {cfg.save_precision}")
    return out
