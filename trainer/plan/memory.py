"""`plan_memory`: a recipe's plan against a budget, with advice when it does not fit.

The advice re-plans the recipe once per change it tries; identical recipes are planned once
(`Evaluator` remembers its evaluations for the life of the object, e.g. one `plan` command).
"""

from __future__ import annotations

import logging

from trainer.config import TrainConfig
from trainer.optim import OptimizerFile
from trainer.plan.activations import PassResult
from trainer.plan.advice import advise
from trainer.plan.model import Change, MemoryPlan, Skipped
from trainer.plan.planner import Evaluation, evaluate


class _Once(logging.Filter):
    """Drops a log record whose message this evaluator has already let through: every re-plan
    builds the recipe's optimizers again, and their warnings about the config (the same file)
    would otherwise repeat once per change the advice tries."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class Evaluator:
    """`planner.evaluate` with memory: each distinct recipe is planned once, and each distinct
    planning pass (`planner.pass_key`) run once."""

    def __init__(self, device: str, processes: int = 1) -> None:
        self.device = device
        self.processes = processes
        self._done: dict[tuple[str, str], Evaluation] = {}
        self._passes: dict[str, PassResult] = {}
        self._once = _Once()

    def __call__(self, cfg: TrainConfig, opt_file: OptimizerFile) -> Evaluation:
        key = (cfg.model_dump_json(), opt_file.model_dump_json())
        if key not in self._done:
            self._done[key] = evaluate(
                cfg, opt_file, self.device, processes=self.processes, passes=self._passes
            )
        return self._done[key]

    def total(self, cfg: TrainConfig, opt_file: OptimizerFile) -> int:
        return sum(self(cfg, opt_file).categories.values())


def plan_memory(
    cfg: TrainConfig,
    opt_file: OptimizerFile,
    *,
    device: str = "cuda",
    budget_bytes: int | None = None,
    budget_source: str = "",
    with_advice: bool = True,
    processes: int = 1,
    evaluator: Evaluator | None = None,
) -> MemoryPlan:
    """Plan `cfg` on `device` ("cuda" or "cpu") for each of `processes` DDP processes; with a
    budget, say whether it fits and, when it does not and `with_advice`, which changes make it fit."""
    evaluator = evaluator or Evaluator(device, processes)
    base = evaluator(cfg, opt_file)
    total = sum(base.categories.values())
    changes: list[Change] = []
    skipped: list[Skipped] = []
    fits_after: bool | None = None
    if budget_bytes is not None and total > budget_bytes and with_advice:
        changes, skipped, fits_after = advise(cfg, opt_file, total, budget_bytes, evaluator.total)
    return MemoryPlan(
        device=device,
        settings=base.settings,
        categories=base.categories,
        sizes=base.sizes,
        budget_bytes=budget_bytes,
        budget_source=budget_source,
        advice=tuple(changes),
        skipped=tuple(skipped),
        notes=base.notes,
        advice_fits=fits_after,
        host=base.host,
    )
