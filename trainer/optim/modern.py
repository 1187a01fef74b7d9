"""Registry entries for the newer optimizers users bring from OneTrainer and kohya: schedule-free
AdamW / SGD / RAdam, Prodigy + schedule-free, CAME and ADOPT.

Kept apart from catalogue.py so that file stays the classic table; its `SPECS` list adds
these. Package choices (docs/OPTIMIZERS.md says why): `schedulefree` is Meta's reference
implementation; `prodigy-plus-schedule-free` is the Prodigy + schedule-free fork OneTrainer and
kohya ship; CAME and ADOPT come from `pytorch-optimizer`, which is released monthly and tested,
whereas the CAME authors' `came-pytorch` has had no release since 2023 and ADOPT's authors publish
no package.
"""

from __future__ import annotations

_SF_COMMON = ("weight_decay", "warmup_steps", "r", "weight_lr_power", "foreach")

# ProdigyPlusScheduleFree keyword arguments we expose. `fused_back_pass` is left out: it hooks
# kohya's own back-pass code, which this trainer does not have (see fused_backward.py).
PRODIGY_SF_KEYS = (
    "betas",
    "beta3",
    "epsilon",
    "weight_decay",
    "weight_decay_by_lr",
    "d0",
    "d_coef",
    "d_limiter",
    "prodigy_steps",
    "schedulefree_c",
    "split_groups",
    "split_groups_mean",
    "factored",
    "factored_fp32",
    "use_bias_correction",
    "use_stableadamw",
    "use_schedulefree",
    "use_speed",
    "stochastic_rounding",
    "use_cautious",
    "use_grams",
    "use_adopt",
    "use_orthograd",
    "use_focus",
)


def modern_specs(spec) -> list:
    """The OptimizerSpecs of this module, built with `trainer.optim.spec.make_spec` (passed in to
    avoid an import cycle)."""
    return [
        spec(
            "adamw_schedulefree",
            "schedulefree",
            "AdamWScheduleFree",
            "schedulefree",
            ("betas", "epsilon", *_SF_COMMON),
            "Schedule-free AdamW (Meta's schedulefree); constant LR, own warmup_steps",
            schedule_free=True,
        ),
        spec(
            "sgd_schedulefree",
            "schedulefree",
            "SGDScheduleFree",
            "schedulefree",
            ("momentum", *_SF_COMMON),
            "Schedule-free SGD (Meta's schedulefree); constant LR, own warmup_steps",
            schedule_free=True,
        ),
        spec(
            "radam_schedulefree",
            "schedulefree",
            "RAdamScheduleFree",
            "schedulefree",
            ("betas", "epsilon", "weight_decay", "r", "weight_lr_power", "foreach", "silent_sgd_phase"),
            "Schedule-free RAdam (Meta's schedulefree); no warmup needed",
            schedule_free=True,
        ),
        spec(
            "prodigy_schedulefree",
            "prodigyplus",
            "ProdigyPlusScheduleFree",
            "prodigy-plus-schedule-free",
            PRODIGY_SF_KEYS,
            "Prodigy + schedule-free (prodigy-plus-schedule-free); lr is a multiplier on d",
            default_lr=1.0,
            adaptive=True,
            schedule_free=True,
        ),
        spec(
            "came",
            "pytorch_optimizer",
            "CAME",
            "pytorch-optimizer",
            (
                "betas",
                "weight_decay",
                "weight_decouple",
                "fixed_decay",
                "clip_threshold",
                "ams_bound",
                "eps1",
                "eps2",
                "maximize",
                "foreach",
            ),
            "CAME, confidence-guided factored Adam (pytorch-optimizer; betas has 3 values)",
            betas_len=3,
        ),
        spec(
            "adopt",
            "pytorch_optimizer",
            "ADOPT",
            "pytorch-optimizer",
            ("betas", "epsilon", "weight_decay", "weight_decouple", "fixed_decay", "maximize", "foreach"),
            "ADOPT, Adam with the current gradient left out of its own scaling (pytorch-optimizer)",
        ),
    ]
