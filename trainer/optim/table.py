"""The start-up table: what each component will really train with, and where its LR came from.

Printed because ED2 users trained overnight at an LR they never set (ED2 issue #102).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.optim.spec import SCHEDULE_KEYS

if TYPE_CHECKING:
    from trainer.optim.component import ComponentOptimizer

_SHOWN_SEPARATELY = {"betas", "epsilon", "weight_decay", *SCHEDULE_KEYS}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple | list):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _rows(comp: ComponentOptimizer) -> dict[str, str]:
    r = comp.resolved
    warmup = _fmt(r.lr_warmup_steps) + (" (ignored by constant)" if r.lr_scheduler == "constant" else "")
    scheduler = r.lr_scheduler
    if r.lr_scheduler == "cosine_with_restarts":
        scheduler += f" (cycles {r.num_cycles})"
    elif r.lr_scheduler == "polynomial":
        scheduler += f" (power {_fmt(r.power)})"
    others = {k: v for k, v in r.options.items() if k not in _SHOWN_SEPARATELY}
    return {
        "optimizer": r.optimizer + (" (8-bit state)" if comp.spec.eight_bit else ""),
        "lr": _fmt(r.lr) + ("  x d (adaptive)" if comp.spec.adaptive else ""),
        "lr from": r.lr_source,
        "scheduler": scheduler,
        "warmup steps": warmup,
        "decay steps": _fmt(r.lr_decay_steps),
        "betas": _fmt(r.options.get("betas")),
        "epsilon": _fmt(r.options.get("epsilon")),
        "weight decay": _fmt(r.options.get("weight_decay")),
        "other options": ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(others.items())) or "-",
        "trainable params": f"{comp.trainable_count:,}",
        "frozen params": f"{comp.frozen_count:,}",
        "freezing": comp.freeze_description or "-",
    }


def render_summary(components: dict[str, ComponentOptimizer], clip_grad_norm: float | None) -> str:
    """A fixed-width table, one column per trained component (unset library defaults shown as '-')."""
    columns = {name: _rows(comp) for name, comp in components.items()}
    labels = list(next(iter(columns.values())))
    label_w = max(len(s) for s in labels)
    widths = {n: max(len(n), *(len(v) for v in col.values())) for n, col in columns.items()}
    header = " | ".join([" " * label_w, *(n.ljust(widths[n]) for n in columns)])
    lines = [header, "-" * len(header)]
    for label in labels:
        cells = [columns[n][label].ljust(widths[n]) for n in columns]
        lines.append(" | ".join([label.ljust(label_w), *cells]))
    lines.append(f"clip_grad_norm: {_fmt(clip_grad_norm)} (all components)")
    return "\n".join(lines)
