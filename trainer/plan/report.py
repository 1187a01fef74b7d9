"""A memory plan as the table people read and as the JSON object scripts read."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from trainer.plan.host import HOST_CATEGORIES, HOST_LABELS, PHASES
from trainer.plan.model import CATEGORIES, CATEGORY_LABELS, GIB, Change, MemoryPlan


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def describe_change(change: Change) -> str:
    """`cache_latents: true`, `optimizer.json base.optimizer: adamw8bit`, ..."""
    parts = [f"{k}: {json.dumps(v)}" for k, v in change.train_json.items()]
    parts += [
        f"optimizer.json {section}.optimizer: {name}" for section, name in (change.optimizers or {}).items()
    ]
    return ", ".join(parts)


def plan_table(plan: MemoryPlan) -> str:
    s = plan.settings
    lines = [
        f"memory plan for {s['model']} on {plan.device}",
        f"  bucket {s['bucket']}, batch {s['batch_size']} x grad_accum {s['grad_accum']}, "
        f"autocast {s['autocast']}, stored as " + ", ".join(f"{k} {v}" for k, v in s["dtypes"].items()),
        "  trains "
        + ", ".join(f"{k} ({v})" for k, v in s["optimizers"].items())
        + "; "
        + ", ".join(
            f"{k} {'on' if s[k] else 'off'}"
            for k in ("cache_latents", "gradient_checkpointing", "fused_back_pass")
        ),
        "",
        f"  {'category':<40} {'GiB':>9}",
    ]
    for key in CATEGORIES:
        if plan.categories[key]:
            lines.append(f"  {CATEGORY_LABELS[key]:<40} {plan.categories[key] / GIB:>9.3f}")
    lines.append(f"  {'total at the peak':<40} {plan.total_bytes / GIB:>9.3f}")
    if plan.budget_bytes is not None:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        margin = plan.budget_bytes - plan.total_bytes
        spare = f"{gib(margin)} to spare" if margin >= 0 else f"{gib(-margin)} over"
        lines.append(
            f"  {'budget (' + plan.budget_source + ')':<40} {plan.budget_bytes / GIB:>9.3f}   {verdict} ({spare})"
        )
    lines += _advice_lines(plan)
    lines += _host_lines(plan)
    if plan.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


def _host_lines(plan: MemoryPlan) -> list[str]:
    """The second table: the peak host RSS, by category, with the moment each belongs to."""
    host = plan.host
    if host is None:
        return []
    lines = ["", f"  {'host memory (RSS)':<40} {'GiB':>9}   moment"]
    for key in HOST_CATEGORIES:
        if host.categories[key]:
            moments = " + ".join(name for name, keys in PHASES.items() if key in keys)
            lines.append(f"  {HOST_LABELS[key]:<40} {host.categories[key] / GIB:>9.3f}   {moments}")
    for name, total in host.phases.items():
        lines.append(f"  {'total at ' + name:<40} {total / GIB:>9.3f}")
    lines.append(f"  {'host peak (' + host.peak_phase + ')':<40} {host.total_bytes / GIB:>9.3f}")
    return lines


def _advice_lines(plan: MemoryPlan) -> list[str]:
    if plan.fits is not False:
        return []
    if not plan.advice:
        lines = ["", "no change the planner knows makes it fit."]
    else:
        head = (
            "these changes make it fit" if plan.advice_fits else "even all these changes do not make it fit"
        )
        lines = ["", f"{head} (cheapest first, in order of their speed cost):"]
        for i, change in enumerate(plan.advice, 1):
            lines.append(
                f"  {i}. {describe_change(change)}: saves {gib(change.saves_bytes)} -> {gib(change.total_after)}"
            )
            lines.append(f"     speed: {change.speed_cost}")
    lines += [f"  not offered: {s.name}: {s.reason}" for s in plan.skipped]
    return lines


def plan_json(plan: MemoryPlan) -> dict[str, Any]:
    return {
        "device": plan.device,
        "total_bytes": plan.total_bytes,
        "budget_bytes": plan.budget_bytes,
        "budget_source": plan.budget_source,
        "fits": plan.fits,
        "categories": dict(plan.categories),
        "sizes": asdict(plan.sizes),
        "settings": plan.settings,
        "advice": [
            {
                "change": describe_change(c),
                "train_json": c.train_json,
                "optimizers": c.optimizers,
                "saves_bytes": c.saves_bytes,
                "total_after_bytes": c.total_after,
                "speed_cost": c.speed_cost,
            }
            for c in plan.advice
        ],
        "advice_fits": plan.advice_fits,
        "not_offered": [{"change": s.name, "reason": s.reason} for s in plan.skipped],
        "notes": list(plan.notes),
        "host": None
        if plan.host is None
        else {
            "total_bytes": plan.host.total_bytes,
            "categories": dict(plan.host.categories),
            "phases": dict(plan.host.phases),
            "peak_phase": plan.host.peak_phase,
            "notes": list(plan.host.notes),
        },
    }
