"""The start-up check: does the recipe fit, decided before the model loads.

`check_budget` plans the recipe against a budget and raises `DoesNotFit` (a ConfigError, exit
code 2) with the plan's table and advice when it does not fit: a run that cannot fit stops in
seconds instead of running out of memory minutes later. `fit_to_budget` (train.json
`auto_fit: true`) applies the advice instead and says which changes it made. `out_of_memory_report`
is what a run that still runs out of memory logs.
"""

from __future__ import annotations

import logging

import torch

from trainer.config import TrainConfig
from trainer.optim import OptimizerFile, load_optimizer_file
from trainer.plan.advice import with_optimizers
from trainer.plan.memory import Evaluator, plan_memory
from trainer.plan.model import GIB, MemoryPlan
from trainer.plan.report import describe_change, gib, plan_table
from trainer.runtime.errors import ConfigError

log = logging.getLogger(__name__)


class DoesNotFit(ConfigError):
    """The recipe's planned peak exceeds the budget; `plan` holds the table and the advice."""

    def __init__(self, message: str, plan: MemoryPlan) -> None:
        super().__init__(message)
        self.plan = plan


def resolve_budget(vram_gib: float | None, device: str) -> tuple[int | None, str]:
    """The budget in bytes and where it comes from: `vram` (GiB) when given, else the free
    memory of the CUDA device, else none (a CPU run without `vram` is not checked)."""
    if vram_gib is not None:
        if vram_gib <= 0:
            raise ConfigError(
                f"vram: {vram_gib} GiB is not a memory size; give the GPU's memory in GiB, e.g. 8"
            )
        return int(vram_gib * GIB), f"vram {vram_gib:g} GiB"
    if device == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, f"free memory of {torch.cuda.get_device_name()}"
    return None, ""


def check_budget(
    cfg: TrainConfig,
    opt_file: OptimizerFile | None,
    budget_bytes: int,
    *,
    device: str,
    budget_source: str,
    processes: int = 1,
) -> MemoryPlan:
    """The plan of `cfg` on `device` (per process of `processes`); raises DoesNotFit (table and
    advice) when it exceeds `budget_bytes`. No weights are loaded: it takes seconds."""
    opt_file = opt_file or load_optimizer_file(cfg.optimizer_config)
    plan = plan_memory(
        cfg,
        opt_file,
        device=device,
        budget_bytes=budget_bytes,
        budget_source=budget_source,
        processes=processes,
    )
    if not plan.fits:
        raise does_not_fit(plan)
    log.info("memory plan: %s of %s (%s): fits", gib(plan.total_bytes), gib(budget_bytes), budget_source)
    return plan


def does_not_fit(plan: MemoryPlan) -> DoesNotFit:
    """The error for a plan over its budget: the table, the advice, and what to do."""
    assert plan.budget_bytes is not None  # a plan without a budget always fits
    hint = (
        "Apply the changes above (or set auto_fit: true to let the trainer apply them)"
        if plan.advice_fits
        else "Lower the resolution or batch size, or freeze a component (disable_textenc_training)"
    )
    return DoesNotFit(
        f"this recipe does not fit: it needs {gib(plan.total_bytes)} at its peak and the budget is "
        f"{gib(plan.budget_bytes)} ({plan.budget_source}).\n{plan_table(plan)}\n\n{hint}; or set vram to "
        "the memory you really have.",
        plan,
    )


def fit_to_budget(
    cfg: TrainConfig,
    opt_file: OptimizerFile | None,
    budget_bytes: int,
    *,
    device: str,
    budget_source: str,
    processes: int = 1,
) -> tuple[TrainConfig, OptimizerFile, MemoryPlan]:
    """`auto_fit`: the recipe with the plan's advice applied, and its plan. Logs each change;
    raises DoesNotFit when no advice makes it fit."""
    opt_file = opt_file or load_optimizer_file(cfg.optimizer_config)
    evaluator = Evaluator(device, processes)
    plan = plan_memory(
        cfg,
        opt_file,
        device=device,
        budget_bytes=budget_bytes,
        budget_source=budget_source,
        evaluator=evaluator,
    )
    if plan.fits:
        return cfg, opt_file, plan
    if not plan.advice_fits:
        raise does_not_fit(plan)
    for change in plan.advice:
        cfg = cfg.model_copy(update=change.train_json)
        if change.optimizers:
            opt_file = with_optimizers(opt_file, change.optimizers)
        log.warning(
            "auto_fit: %s (saves %s; speed: %s)",
            describe_change(change),
            gib(change.saves_bytes),
            change.speed_cost,
        )
    fitted = plan_memory(
        cfg,
        opt_file,
        device=device,
        budget_bytes=budget_bytes,
        budget_source=budget_source,
        evaluator=evaluator,
    )
    log.info(
        "auto_fit: the recipe now plans %s of %s (%s)",
        gib(fitted.total_bytes),
        gib(budget_bytes),
        budget_source,
    )
    return cfg, opt_file, fitted


def out_of_memory_report(cfg: TrainConfig, opt_file: OptimizerFile, device: str, step: int) -> str:
    """What the loop logs when a step runs out of memory anyway: the plan of this recipe and,
    against the device's total memory, the advice."""
    total = torch.cuda.mem_get_info()[1] if device == "cuda" and torch.cuda.is_available() else None
    plan = plan_memory(cfg, opt_file, device=device, budget_bytes=total, budget_source="device total memory")
    return (
        f"out of memory at optimizer step {step}; nothing was saved for this step and the last checkpoint "
        f"is unchanged. The memory plan of this recipe:\n{plan_table(plan)}"
    )


def startup_check(
    cfg: TrainConfig, *, device: str, processes: int = 1
) -> tuple[TrainConfig, OptimizerFile | None]:
    """The check `build_session` runs before the model loads: the recipe against `vram` (or the
    CUDA device's free memory). Raises DoesNotFit; with `auto_fit` returns the fitted recipe and
    its optimizer file instead. Without an explicit `vram`, an optimizer the plan does not model
    or a planning failure is logged as a warning and the run goes on unchecked: the implicit
    check must never stop a run it cannot judge (an explicit `vram` is a request, and raises)."""
    from trainer.plan.optimizer_state import UnmodelledOptimizer

    budget, source = resolve_budget(cfg.vram, device)
    if budget is None:
        return cfg, None
    try:
        if cfg.auto_fit:
            fitted, opt_file, _plan = fit_to_budget(
                cfg, None, budget, device=device, budget_source=source, processes=processes
            )
            return fitted, opt_file
        check_budget(cfg, None, budget, device=device, budget_source=source, processes=processes)
        return cfg, None
    except DoesNotFit:
        raise
    except (UnmodelledOptimizer, RuntimeError, ValueError, NotImplementedError) as exc:
        if cfg.vram is not None:
            raise
        log.warning("memory plan skipped, the run is not checked against %s: %s", source, exc)
        return cfg, None
