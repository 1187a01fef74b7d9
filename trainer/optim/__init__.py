"""Pluggable optimizers: optimizer.json (EveryDream2 schema), registry, precedence, schedules,
text-encoder freezing, and the optimizer sets the training loop steps through one protocol
(`TrainingOptimizer`: the per-component `OptimizerSet`, or `FusedOptimizerSet` for the fused back pass).

Optional packages are imported only when their optimizer is built.
"""

from trainer.optim.component import ComponentOptimizer, StepResult
from trainer.optim.freezing import FreezePlan, apply_text_encoder_freeze, plan_text_encoder_freeze
from trainer.optim.fused_backward import FusedOptimizerSet
from trainer.optim.grad_scaler import apply_grad_scaler_tweak, grad_scaler_tweak
from trainer.optim.optimizer_set import OptimizerSet, build_optimizers
from trainer.optim.protocol import TrainingOptimizer
from trainer.optim.registry import REGISTRY, get_spec
from trainer.optim.resolve import (
    ResolvedComponent,
    TrainOptimSettings,
    check_text_encoder_lr_scale,
    resolve_components,
)
from trainer.optim.schedule_free import eval_weights
from trainer.optim.schedules import SCHEDULER_NAMES
from trainer.optim.schema import (
    FreezingConfig,
    OptimizerFile,
    SectionConfig,
    load_optimizer_file,
    parse_optimizer_json,
)
from trainer.optim.spec import OptimizerSpec
from trainer.runtime.errors import OptionalDependencyError

__all__ = [
    "REGISTRY",
    "SCHEDULER_NAMES",
    "ComponentOptimizer",
    "FreezePlan",
    "FreezingConfig",
    "FusedOptimizerSet",
    "OptimizerFile",
    "OptimizerSet",
    "OptimizerSpec",
    "OptionalDependencyError",
    "ResolvedComponent",
    "SectionConfig",
    "StepResult",
    "TrainOptimSettings",
    "TrainingOptimizer",
    "apply_grad_scaler_tweak",
    "apply_text_encoder_freeze",
    "build_optimizers",
    "eval_weights",
    "get_spec",
    "grad_scaler_tweak",
    "load_optimizer_file",
    "parse_optimizer_json",
    "plan_text_encoder_freeze",
    "resolve_components",
    "check_text_encoder_lr_scale",
]
