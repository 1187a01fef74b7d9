"""Cross-checks and the start-up summary of the options users bring from kohya and OneTrainer.

The keys themselves are `TrainConfig` fields (trainer/config/); this module refuses the
combinations that would silently do nothing or contradict each other, before anything loads,
and names the active ones for the start-up log. docs/CONFIG.md explains each rule's source.
"""

from __future__ import annotations

KOHYA_MULTIRES_DISCOUNT = 0.3  # sd-scripts' default --multires_noise_discount


def check_extra_options(cfg) -> None:
    """Refuse combinations of the kohya/OneTrainer keys that would do nothing or contradict."""
    stop = cfg.stop_text_encoder_training
    if stop is not None:
        if isinstance(stop, int) and stop < 1:  # true/false never gets here: the field is strict
            raise ValueError(
                f"stop_text_encoder_training={stop!r}: give optimizer steps (an integer >= 1) or a fraction "
                "of the run (0 < x < 1); null = never stop"
            )
        if isinstance(stop, float) and not 0.0 < stop < 1.0:
            raise ValueError(
                f"stop_text_encoder_training={stop!r}: a fraction must be between 0 and 1 (exclusive); "
                "write a step count as an integer (e.g. 100, not 100.0)"
            )
        if cfg.disable_textenc_training:
            raise ValueError(
                "stop_text_encoder_training has nothing to stop: disable_textenc_training is true"
            )
        if cfg.fused_back_pass:
            raise ValueError(
                "stop_text_encoder_training cannot be combined with fused_back_pass (its per-parameter "
                "optimizers live inside backward); set one of them off"
            )
    needs = {
        "mask_from_alpha": ("masked_loss", cfg.mask_from_alpha, cfg.masked_loss),
        "normalize_masked_area_loss": ("masked_loss", cfg.normalize_masked_area_loss, cfg.masked_loss),
        "ip_noise_gamma_random_strength": (
            "ip_noise_gamma",
            cfg.ip_noise_gamma_random_strength,
            cfg.ip_noise_gamma,
        ),
        "noise_offset_random_strength": (
            "zero_frequency_noise_ratio",
            cfg.noise_offset_random_strength,
            cfg.zero_frequency_noise_ratio,
        ),
    }
    for key, (needed, on, base) in needs.items():
        if on and not base:
            raise ValueError(
                f"{key} is true but does nothing without {needed} (set {needed}, or {key} false)"
            )
    default_weight = type(cfg).model_fields["unmasked_weight"].default
    if cfg.unmasked_weight != default_weight and not cfg.masked_loss:  # the default: train_effective.json
        raise ValueError(
            f"unmasked_weight {cfg.unmasked_weight} does nothing without masked_loss: set masked_loss true "
            "or drop the key"
        )
    if (
        cfg.multires_noise_discount is not None
        and cfg.pyramid_noise_discount is not None
        and cfg.multires_noise_discount != cfg.pyramid_noise_discount
    ):
        raise ValueError(
            f"multires_noise_discount ({cfg.multires_noise_discount}) and pyramid_noise_discount "
            f"({cfg.pyramid_noise_discount}) are two names of one setting; set only one"
        )
    if cfg.multires_noise_iterations is not None and cfg.pyramid_discount == 0.0:
        raise ValueError(
            "multires_noise_iterations is set but the pyramid noise discount is 0 (off); "
            "set pyramid_noise_discount above 0 or drop multires_noise_iterations"
        )
    if cfg.save_precision not in (None, "fp32") and cfg.save_full_precision:
        raise ValueError(
            f"save_precision {cfg.save_precision!r} contradicts save_full_precision true (fp32); set one of them"
        )


def active_extra_options(cfg) -> list[str]:
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


def extra_step_settings(cfg) -> dict:
    """StepSettings keyword arguments of these options (the step's defaults change nothing)."""
    out = (
        {} if cfg.multires_noise_iterations is None else {"pyramid_iterations": cfg.multires_noise_iterations}
    )
    return out | {
        "noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ip_noise_gamma": cfg.ip_noise_gamma or 0.0,
        "ip_noise_gamma_random_strength": cfg.ip_noise_gamma_random_strength,
        "debiased_estimation_loss": cfg.debiased_estimation_loss,
        "masked_loss": cfg.masked_loss,
        "unmasked_weight": cfg.unmasked_weight if cfg.masked_loss else 1.0,
        "normalize_masked_area_loss": cfg.normalize_masked_area_loss,
    }
