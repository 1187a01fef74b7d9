"""kohya -> this trainer: run length, LR schedule and warmup.

* Run length: `max_train_epochs` (wins, as in sd-scripts) or the GUI's `epoch` -> `max_epochs`; a
  step count (`max_train_steps`, sd-scripts' default 1600) needs `--steps_per_epoch`.
* Warmup: an int is optimizer steps; a float below 1 (sd-scripts) or the GUI's `lr_warmup`
  percentage is a fraction of the run: `int(fraction * total optimizer steps)`, kohya's rounding.
* Decaying schedules end at kohya's `max_train_steps`, so `lr_decay_steps` = total steps.
"""

from __future__ import annotations

import math
from typing import Any

from trainer.importing.rows import DEFAULT, NOT_SUPPORTED, OFF, Row
from trainer.optim.schedules import SCHEDULER_NAMES
from trainer.runtime.errors import ConfigError

# kohya names that mean the same schedule here (both use diffusers / transformers schedules).
KOHYA_SCHEDULERS = SCHEDULER_NAMES
DECAYING = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def run_length(ctx) -> int | None:
    """max_epochs, and the total optimizer steps when they can be known."""
    spe = ctx.steps_per_epoch
    epochs = ctx.get("max_train_epochs")
    gui_epoch = ctx.get("epoch")
    steps = ctx.get("max_train_steps")
    for key, value in (("max_train_epochs", epochs), ("epoch", gui_epoch), ("max_train_steps", steps)):
        if ctx.has(key) and value is None:
            ctx.row(Row(key, ctx.raw(key), OFF, note="0/unset: not the source of the run length"))
    if epochs is not None or (gui_epoch is not None and steps is None):
        key, n = ("max_train_epochs", epochs) if epochs is not None else ("epoch", gui_epoch)
        note = "kohya's max_train_epochs wins over max_train_steps" if epochs is not None and steps else ""
        ctx.result.set_train("max_epochs", int(n), key, ctx.raw(key), note)
        if steps is not None:
            ctx.row(Row("max_train_steps", steps, OFF, note="overridden by the epoch count, as in kohya"))
        return int(n) * spe if spe else None
    if steps is None:
        steps = 1600
        if ctx.kind == "gui":
            raise ConfigError(
                f"{ctx.source}: no run length: set 'epoch', 'max_train_epochs' or 'max_train_steps'"
            )
    if not spe:
        raise ConfigError(
            f"{ctx.source}: max_train_steps={steps} counts optimizer steps, this trainer counts epochs. "
            "Pass --steps_per_epoch N (images x repeats / batch size / grad accum) or set max_train_epochs"
        )
    n = math.ceil(steps / spe)
    note = f"ceil({steps} / {spe} steps per epoch)"
    if steps % spe:
        note += f"; the last epoch runs {n * spe - steps} steps past kohya's stop, the schedule still ends at {steps}"
    status = "mapped" if ctx.has("max_train_steps") else DEFAULT
    ctx.result.set_train("max_epochs", n, "max_train_steps", steps, note, status=status)
    return steps


def _warmup(ctx, total: int | None) -> tuple[int, str, str, Any]:
    """(steps, source key, note, source value) for the warmup; fractions need `total`."""
    steps_val = ctx.get("lr_warmup_steps")
    if ctx.kind == "gui":
        pct = ctx.get("lr_warmup") or 0
        if steps_val:
            if pct:
                ctx.row(Row("lr_warmup", pct, OFF, note="lr_warmup_steps wins, as in the GUI"))
            return int(steps_val), "lr_warmup_steps", "", steps_val
        if ctx.has("lr_warmup_steps"):
            ctx.row(Row("lr_warmup_steps", ctx.raw("lr_warmup_steps"), OFF, note="0: lr_warmup applies"))
        fraction, key, raw = pct / 100, "lr_warmup", pct
    else:
        if steps_val is None or steps_val == 0:
            return (
                0,
                "lr_warmup_steps",
                "" if ctx.has("lr_warmup_steps") else "kohya's default is 0",
                steps_val or 0,
            )
        if isinstance(steps_val, int) or steps_val >= 1:
            return int(steps_val), "lr_warmup_steps", "optimizer steps", steps_val
        fraction, key, raw = float(steps_val), "lr_warmup_steps", steps_val
    if fraction == 0:
        return 0, key, "", raw
    if total is None:
        raise ConfigError(
            f"{ctx.source}: {key}={raw} is a fraction of the run, whose length in steps is unknown here "
            "(epochs x steps per epoch). Pass --steps_per_epoch N (images x repeats / batch size / grad accum)"
        )
    return int(fraction * total), key, f"int({fraction:g} x {total} total steps)", raw


def schedule(ctx, total: int | None, adaptive: bool) -> None:
    name = ctx.get("lr_scheduler") or "constant"
    src = "lr_scheduler" if ctx.has("lr_scheduler") else "lr_scheduler (absent)"
    warmup, wkey, wnote, wraw = _warmup(ctx, total)
    if adaptive:
        ctx.result.set_optim(
            "base",
            "lr_scheduler",
            "adafactor",
            src,
            name,
            "Adafactor with relative_step needs it (kohya forces it too)",
        )
        ctx.row(
            Row(wkey, wraw, OFF if not warmup else NOT_SUPPORTED, note="the adafactor schedule has no warmup")
        )
        return
    if name not in KOHYA_SCHEDULERS:
        ctx.row(
            Row(
                src,
                name,
                NOT_SUPPORTED,
                note=f"no '{name}' schedule here; constant is used. Known: {', '.join(KOHYA_SCHEDULERS)}",
            )
        )
        name = "constant"
    elif name == "constant" and warmup:
        ctx.result.set_optim(
            "base",
            "lr_scheduler",
            "constant_with_warmup",
            src,
            name,
            "kohya refuses a warmup with constant; constant_with_warmup is what was meant",
        )
        name = "constant_with_warmup"
    else:
        ctx.result.set_optim(
            "base", "lr_scheduler", name, src, name, "" if ctx.has("lr_scheduler") else "kohya's default"
        )
    status = "mapped" if ctx.has(wkey) else DEFAULT
    ctx.result.set_optim(
        "base", "lr_warmup_steps", warmup, wkey, wraw, wnote or "optimizer steps", status=status
    )
    if name in DECAYING:
        if total is None:
            ctx.row(
                Row(
                    "(run length)",
                    "epochs",
                    NOT_SUPPORTED,
                    note=(
                        "kohya decays to the end of the run; without --steps_per_epoch lr_decay_steps stays null and this "
                        "trainer decays over 1.5x the run (docs/OPTIMIZERS.md)"
                    ),
                )
            )
        else:
            ctx.result.set_optim(
                "base", "lr_decay_steps", total, "(run length)", total, "kohya decays over the whole run"
            )
    for key, ours in (
        ("lr_scheduler_num_cycles", "lr_scheduler_num_cycles"),
        ("lr_scheduler_power", "lr_scheduler_power"),
    ):
        if not ctx.has(key):
            continue
        value = ctx.get(key)
        used = (key.endswith("cycles") and name == "cosine_with_restarts") or (
            key.endswith("power") and name == "polynomial"
        )
        if used and value is not None:
            value = int(value) if key.endswith("cycles") else float(value)
            ctx.result.set_optim("base", ours, value, key, ctx.raw(key))
        else:
            ctx.row(Row(key, ctx.raw(key), OFF, note=f"unused by {name}"))
