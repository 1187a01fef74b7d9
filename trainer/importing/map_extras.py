"""kohya -> this trainer: the options that have a train.json key of the same meaning since the
kohya/OneTrainer additions (masked loss, debiased estimation, input perturbation, epoch-wise
caption dropout, keep_tokens_separator, stop_text_encoder_training, save_every_n_steps).

Rules whose meaning differs are spelled out in the row notes and in docs/MIGRATING.md:

* kohya's `masked_loss` multiplies the loss by the mask (no floor, no normalisation): the import
  writes `unmasked_weight` 0. kohya reads those masks from `conditioning_data_dir` (a folder of
  same-named images); here a mask is `<image stem>-masklabel.png` beside its image, so the
  files must be renamed. `alpha_mask` alone turns masked loss on (kohya applies it whenever
  alpha masks are loaded): `masked_loss` + `mask_from_alpha`.
* `stop_text_encoder_training` N counts optimizer steps in sd-scripts (the kohya_ss GUI labels
  the field "% of total steps" but passes the number as steps), -1 = never train it
  (`disable_textenc_training`). The GUI's older `stop_text_encoder_training_pct` P is P / 100.
"""

from __future__ import annotations

from trainer.importing.rows import OFF, Row

_MASK_FILES = "masks are <image stem>-masklabel.png beside each image (rename kohya's conditioning images)"


def _flag(ctx, key: str, ours: str, note: str = "") -> bool:
    """A boolean key of the same meaning; returns whether it is on."""
    if not ctx.has(key):
        return False
    on = bool(ctx.get(key))
    if on:
        ctx.result.set_train(ours, True, key, ctx.raw(key), note)
    else:
        ctx.row(Row(key, ctx.raw(key), OFF, note="off in the source"))
    return on


def _masks(ctx) -> None:
    masked = _flag(ctx, "masked_loss", "masked_loss", _MASK_FILES)
    alpha = bool(ctx.get("alpha_mask"))
    if alpha:
        ctx.result.set_train(
            "mask_from_alpha", True, "alpha_mask", ctx.raw("alpha_mask"), "the image's alpha"
        )
        if not masked:
            ctx.result.set_train("masked_loss", True, "alpha_mask", ctx.raw("alpha_mask"), "kohya applies it")
    elif ctx.has("alpha_mask"):
        ctx.row(Row("alpha_mask", ctx.raw("alpha_mask"), OFF, note="off in the source"))
    if masked or alpha:
        ctx.result.set_train(
            "unmasked_weight",
            0.0,
            "masked_loss" if masked else "alpha_mask",
            True,
            "kohya: loss x mask, no floor",
        )
    folder = ctx.get("conditioning_data_dir")
    if folder:
        ctx.row(Row("conditioning_data_dir", folder, OFF, note=_MASK_FILES))
    elif ctx.has("conditioning_data_dir"):
        ctx.row(Row("conditioning_data_dir", ctx.raw("conditioning_data_dir"), OFF, note="no mask folder"))


def _loss_and_noise(ctx) -> None:
    _flag(ctx, "debiased_estimation_loss", "debiased_estimation_loss", "1/sqrt(SNR), SNR capped at 1000")
    gamma = ctx.get("ip_noise_gamma")
    if gamma:
        ctx.result.set_train("ip_noise_gamma", float(gamma), "ip_noise_gamma", ctx.raw("ip_noise_gamma"))
        _flag(ctx, "ip_noise_gamma_random_strength", "ip_noise_gamma_random_strength", "drawn per sample")
    else:
        for key in ("ip_noise_gamma", "ip_noise_gamma_random_strength"):
            if ctx.has(key):
                ctx.row(Row(key, ctx.raw(key), OFF, note="no input perturbation in the source"))


def _captions(ctx) -> None:
    every = ctx.get("caption_dropout_every_n_epochs")
    if every:
        ctx.result.set_train(
            "caption_dropout_every_n_epochs",
            int(every),
            "caption_dropout_every_n_epochs",
            ctx.raw("caption_dropout_every_n_epochs"),
        )
    elif ctx.has("caption_dropout_every_n_epochs"):
        ctx.row(
            Row("caption_dropout_every_n_epochs", ctx.raw("caption_dropout_every_n_epochs"), OFF, note="off")
        )
    separator = ctx.get("keep_tokens_separator")
    if separator:
        ctx.result.set_train(
            "keep_tokens_separator",
            str(separator),
            "keep_tokens_separator",
            separator,
            "the separator is removed from unshuffled captions too",
        )
    elif ctx.has("keep_tokens_separator"):
        ctx.row(Row("keep_tokens_separator", ctx.raw("keep_tokens_separator"), OFF, note="off"))


def _text_encoder_stop(ctx) -> None:
    steps = ctx.get("stop_text_encoder_training")
    pct = ctx.get("stop_text_encoder_training_pct")
    if ctx.result.train.get("disable_textenc_training") and (steps or pct):
        for key in ("stop_text_encoder_training", "stop_text_encoder_training_pct"):
            if ctx.has(key):
                ctx.row(Row(key, ctx.raw(key), OFF, note="the text encoder does not train at all"))
        return
    if steps is not None and int(steps) == -1:
        ctx.result.set_train(
            "disable_textenc_training", True, "stop_text_encoder_training", steps, "-1: never trained"
        )
    elif steps:
        note = "optimizer steps (the kohya_ss GUI's '%' label is not what sd-scripts reads)"
        ctx.result.set_train(
            "stop_text_encoder_training", int(steps), "stop_text_encoder_training", steps, note
        )
    elif ctx.has("stop_text_encoder_training"):
        ctx.row(
            Row("stop_text_encoder_training", ctx.raw("stop_text_encoder_training"), OFF, note="never stops")
        )
    if pct and not steps:
        fraction = float(pct) / 100.0
        if fraction >= 1.0:
            ctx.row(Row("stop_text_encoder_training_pct", pct, OFF, note="100 %: trains to the end"))
        else:
            ctx.result.set_train(
                "stop_text_encoder_training", fraction, "stop_text_encoder_training_pct", pct, "P / 100"
            )
    elif ctx.has("stop_text_encoder_training_pct"):
        note = "stop_text_encoder_training wins" if pct else "never stops"
        ctx.row(
            Row("stop_text_encoder_training_pct", ctx.raw("stop_text_encoder_training_pct"), OFF, note=note)
        )


def _step_saves(ctx) -> None:
    every = ctx.get("save_every_n_steps")
    if every:
        ctx.result.set_train(
            "save_every_n_steps", int(every), "save_every_n_steps", ctx.raw("save_every_n_steps")
        )
    elif ctx.has("save_every_n_steps"):
        ctx.row(Row("save_every_n_steps", ctx.raw("save_every_n_steps"), OFF, note="off"))


CONVERTERS = (_masks, _loss_and_noise, _captions, _text_encoder_stop, _step_saves)
KEYS = [
    "masked_loss",
    "alpha_mask",
    "conditioning_data_dir",
    "debiased_estimation_loss",
    "ip_noise_gamma",
    "ip_noise_gamma_random_strength",
    "caption_dropout_every_n_epochs",
    "keep_tokens_separator",
    "stop_text_encoder_training",
    "stop_text_encoder_training_pct",
    "save_every_n_steps",
]
