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

from trainer.checkpointing.resume import optimizer_layout

log = logging.getLogger(__name__)

COMPONENT = "text_encoder"


def stop_text_encoder(parts, *, cfg, unwrap, global_step: int) -> None:
    """Freeze the text encoder and free its optimizer state (idempotent). `parts` is what holds
    the run's objects (the Session, or the builder's Components before it): `optim`, `model`,
    `step`, `ema`, `wrapped`; `unwrap` gives the plain module of a (possibly DDP-wrapped) one."""
    optim = parts.optim
    if COMPONENT not in optim.components:
        return
    optim.stopped_layouts[COMPONENT] = optimizer_layout(optim)[COMPONENT]
    comp = optim.components.pop(COMPONENT)
    comp.optimizer.state.clear()  # the moments: freed now, not when the last reference goes
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


def maybe_stop_text_encoder(session) -> None:
    """After each optimizer step: stop the text encoder once its last step is done."""
    step = session.cfg.text_encoder_stop_step(session.total_optimizer_steps)
    if step is not None and session.state.global_step >= step:
        stop_text_encoder(
            session,
            cfg=session.cfg,
            unwrap=session.accelerator.unwrap_model,
            global_step=session.state.global_step,
        )


def stop_text_encoder_on_resume(cfg, parts, accelerator, resumed_step: int) -> None:
    """Before a resumed run loads its state: apply a stop that happened before the checkpoint
    (`parts`: the builder's Components)."""
    step = cfg.text_encoder_stop_step(parts.total_optimizer_steps)
    if step is not None and resumed_step >= step:
        stop_text_encoder(parts, cfg=cfg, unwrap=accelerator.unwrap_model, global_step=resumed_step)
