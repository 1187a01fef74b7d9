"""stop_text_encoder_training: the text encoder trains for the first N optimizer steps only.

kohya's `--stop_text_encoder_training N` (train_db.py) stops updating the text encoder after
step N; here N may also be a fraction of the run. At the stop the encoder is frozen
(requires_grad off, eval mode), its optimizer and LR schedule are dropped so their state (two
moments per weight for AdamW) is freed, the step calls the plain module (no DDP wrapper left
waiting for gradients), and an EMA keeps the encoder's average so far without updating it.

Exact resume: a checkpoint after the stop holds no text-encoder optimizer state. A run that
resumes at or past the stop step builds the encoder as trainable, exactly as the first run did
(same placement and dtype), and then applies the same stop before loading the state, so both
paths end in identical objects. The resume guard keeps the stopped component's layout, so the
settings check still compares like with like.
"""

from __future__ import annotations

import logging

from trainer.config import TrainConfig
from trainer.parts.builder import Components

log = logging.getLogger(__name__)

COMPONENT = "text_encoder"


def stop_text_encoder(parts: Components, *, cfg: TrainConfig, unwrap, global_step: int) -> None:
    """Freeze the text encoder and free its optimizer state (idempotent); `unwrap` gives the
    plain module of a (possibly DDP-wrapped) one."""
    optim = parts.optim
    if COMPONENT not in optim.components:
        return
    optim.stop_component(COMPONENT)
    encoder = unwrap(parts.model.text_encoder)
    for p in encoder.parameters():
        p.grad = None
    encoder.requires_grad_(False)
    encoder.eval()
    if parts.wrapped:
        parts.wrapped.pop(COMPONENT, None)
    parts.step.text_encoder = encoder
    if parts.ema is not None and COMPONENT in parts.ema.tracked:
        parts.ema.freeze(COMPONENT)
    log.info(
        "text encoder training stopped after step %d (stop_text_encoder_training %s); its optimizer "
        "state is freed",
        global_step,
        cfg.stop_text_encoder_training,
    )


def stop_text_encoder_if_due(cfg: TrainConfig, parts: Components, accelerator, global_step: int) -> None:
    """Stop the text encoder once its last step is done: after each optimizer step, and before
    a resumed run loads its state (a stop that happened before the checkpoint)."""
    step = cfg.text_encoder_stop_step(parts.total_optimizer_steps)
    if step is not None and global_step >= step:
        stop_text_encoder(parts, cfg=cfg, unwrap=accelerator.unwrap_model, global_step=global_step)
