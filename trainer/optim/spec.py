"""What one optimizer name is: where its class lives, which JSON keys it takes, its defaults.

`OptimizerSpec` and the key lists the library families share; the table of every name is
trainer/optim/catalogue.py, the lookup and construction trainer/optim/registry.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.runtime.errors import OptionalDependencyError

# Keys every section may carry whatever the optimizer: they configure LR and schedule.
SCHEDULE_KEYS = (
    "optimizer",
    "lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_decay_steps",
    "lr_scheduler_num_cycles",
    "lr_scheduler_power",
)
# EveryDream2 required these three in every section (KeyError otherwise), so every ED2 file
# carries them even for optimizers that ignore them (e.g. lion has no epsilon). A non-null value
# that the optimizer does not use is therefore dropped with a warning instead of an error.
ED2_ALWAYS_PRESENT_KEYS = frozenset({"betas", "epsilon"})

# JSON key -> constructor keyword, where the names users know differ from the library's.
JSON_TO_KEYWORD = {"epsilon": "eps"}

TORCH_ADAM = ("betas", "epsilon", "weight_decay", "amsgrad", "maximize", "foreach", "fused", "capturable")
TORCH_ADAGRAD = (
    "epsilon",
    "weight_decay",
    "lr_decay",
    "initial_accumulator_value",
    "maximize",
    "foreach",
    "fused",
)
TORCH_RMSPROP = (
    "alpha",
    "epsilon",
    "weight_decay",
    "momentum",
    "centered",
    "maximize",
    "foreach",
    "capturable",
)
TORCH_SGD = ("momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "fused")
BNB_ADAM = ("betas", "epsilon", "weight_decay", "amsgrad", "min_8bit_size")
BNB_ADAGRAD = ("epsilon", "weight_decay", "lr_decay", "initial_accumulator_value", "min_8bit_size")
BNB_RMSPROP = ("alpha", "epsilon", "weight_decay", "momentum", "centered", "min_8bit_size")
BNB_SGD = ("momentum", "dampening", "weight_decay", "nesterov", "min_8bit_size")
BNB_LAMB = ("betas", "epsilon", "weight_decay", "bias_correction", "amsgrad", "adam_w_mode", "min_8bit_size")
BNB_LARS = ("momentum", "dampening", "weight_decay", "nesterov", "max_unorm", "min_8bit_size")
BNB_LION = ("betas", "weight_decay", "min_8bit_size")


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer name: where its class lives and which JSON keys it takes.

    `defaults` are values we pass when the user leaves a key unset and they differ from the
    library default (EveryDream2-compatible or required to work at all); they are documented
    in docs/OPTIMIZERS.md and shown in the start-up table.
    """

    name: str
    module: str
    attr: str
    package: str
    keys: tuple[str, ...]
    description: str
    default_lr: float = 1e-6
    defaults: dict[str, Any] = field(default_factory=dict)
    eight_bit: bool = False
    adaptive: bool = False  # D-Adaptation / Prodigy: the effective LR is d * lr
    betas_len: int = 2
    uses_log_every: bool = False  # D-Adaptation: `log_every` defaults to the run's log_step
    # Schedule-free: train-mode and eval-mode weights differ (optimizer.train() / .eval()); see
    # trainer/optim/schedule_free.py. The LR schedule must be constant.
    schedule_free: bool = False

    @property
    def accepted_keys(self) -> tuple[str, ...]:
        return SCHEDULE_KEYS + self.keys

    def load_class(self) -> type[torch.optim.Optimizer]:
        """Import the optimizer class; a missing package names the pip package to install."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise OptionalDependencyError(
                f"optimizer '{self.name}' needs the pip package '{self.package}', which failed to import "
                f"({exc}). Install it with `pip install {self.package}` or choose another optimizer."
            ) from exc
        return getattr(module, self.attr)


def make_spec(name, module, attr, package, keys, description, **kw) -> OptimizerSpec:
    if not kw.get("eight_bit"):  # min_8bit_size means nothing for fp32 state
        keys = [k for k in keys if k != "min_8bit_size"]
    return OptimizerSpec(name, module, attr, package, tuple(keys), description, **kw)


MOMENTUM_REQUIRED = {"momentum": 0.9}  # bitsandbytes SGD/LARS raise on momentum=0
