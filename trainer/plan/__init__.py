"""The memory plan: a recipe's peak device memory by category, computed before anything loads.

The model is built from its configs on shadow tensors (no weights), the trainer's own optimizer
build decides what trains, the optimizers' state layouts give their bytes, and one shadow
training micro-step measures what the forward and backward keep alive. Then a budget (`vram`,
or the GPU's free memory) says whether the recipe fits, and when it does not, which changes
make it fit, cheapest first. See docs/PERFORMANCE.md ("memory plan").

    plan_memory(cfg, opt_file, device="cuda", budget_bytes=8 * 2**30) -> MemoryPlan
    check_budget(cfg, opt_file, budget_bytes, device=..., budget_source=...)   # start-up check
    python -m trainer.plan --config train.json --vram 8 [--json]
"""

from trainer.plan.check import DoesNotFit, check_budget, fit_to_budget, out_of_memory_report, resolve_budget
from trainer.plan.memory import Evaluator, plan_memory
from trainer.plan.model import CATEGORIES, Change, MemoryPlan, PlanSizes
from trainer.plan.report import plan_json, plan_table

__all__ = [
    "CATEGORIES",
    "Change",
    "DoesNotFit",
    "Evaluator",
    "MemoryPlan",
    "PlanSizes",
    "check_budget",
    "fit_to_budget",
    "out_of_memory_report",
    "plan_json",
    "plan_memory",
    "plan_table",
    "resolve_budget",
]
