"""EveryDream2 keys that train.json accepts but that do nothing here, each with the reason
(`IGNORED_KEYS`: loading warns once per key; docs/CONFIG.md lists them). Re-exported by
`trainer.config.schema` and `trainer.config`."""

from __future__ import annotations

# EveryDream2 keys that are accepted for compatibility but have no effect here, with the reason.
IGNORED_KEYS: dict[str, str] = {
    "amp": "deprecated in EveryDream2 too; use mixed_precision",
    "notebook": "notebook mode does not exist here",
    "lowvram": "use gradient_checkpointing and an 8-bit optimizer (docs/PERFORMANCE.md)",
    "disable_xformers": "SDPA attention is the default; use attn_type",
    "scale_lr": "not implemented in EveryDream2 either",
    "useadam8bit": "choose the optimizer in optimizer.json",
    "ed1_mode": "EveryDream1 mode is not supported",
    "gpuid": "select the device with CUDA_VISIBLE_DEVICES or accelerate launch",
    "train_sampler": "only add_noise/get_velocity were used, which do not depend on the sampler",
    "plugins": "EveryDream2 plugins are not supported",
    "rated_dataset": "rated datasets are not supported",
    "rated_dataset_target_dropout_percent": "rated datasets are not supported",
    "load_settings_every_epoch": "hot-reloading the config breaks exact resume",
    "write_schedule": "use python -m trainer.data.preview",
    "save_ckpt_dir": "single files are written inside each checkpoint directory",
    "no_prepend_last": "checkpoint names carry epoch and step",
    "ema_resume_model": "EMA weights are resumed from the training state",
}
# What the command line reads an ignored key's text as (only whether it is set matters).
IGNORED_KEY_TYPE = bool | int | float | str | list[str] | None
