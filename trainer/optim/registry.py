"""Optimizer registry: name -> class, the JSON keys it accepts, and how to build it.

Why a table instead of an if/elif chain (EveryDream2's `_create_optimizer`): the accepted keys
are data, so a key the chosen optimizer does not take is an error that can list the keys it
does take, an unknown name is an error that can list every name, and nothing ever falls back
to AdamW8bit silently. Optional packages (bitsandbytes, lion-pytorch, dadaptation, prodigyopt,
transformers) are imported only when their optimizer is built, so e.g. a broken bitsandbytes
install does not stop a plain `adamw` run.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.optim.bridge import bridge_spec, is_bridge_name
from trainer.optim.modern import modern_specs
from trainer.optim.sync_free import without_host_syncs
from trainer.runtime.errors import ConfigError, OptionalDependencyError

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
_RENAMES = {"epsilon": "eps"}

_TORCH_ADAM = ("betas", "epsilon", "weight_decay", "amsgrad", "maximize", "foreach", "fused", "capturable")
_TORCH_ADAGRAD = (
    "epsilon",
    "weight_decay",
    "lr_decay",
    "initial_accumulator_value",
    "maximize",
    "foreach",
    "fused",
)
_TORCH_RMSPROP = (
    "alpha",
    "epsilon",
    "weight_decay",
    "momentum",
    "centered",
    "maximize",
    "foreach",
    "capturable",
)
_TORCH_SGD = ("momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "fused")
_BNB_ADAM = ("betas", "epsilon", "weight_decay", "amsgrad", "min_8bit_size")
_BNB_ADAGRAD = ("epsilon", "weight_decay", "lr_decay", "initial_accumulator_value", "min_8bit_size")
_BNB_RMSPROP = ("alpha", "epsilon", "weight_decay", "momentum", "centered", "min_8bit_size")
_BNB_SGD = ("momentum", "dampening", "weight_decay", "nesterov", "min_8bit_size")
_BNB_LAMB = ("betas", "epsilon", "weight_decay", "bias_correction", "amsgrad", "adam_w_mode", "min_8bit_size")
_BNB_LARS = ("momentum", "dampening", "weight_decay", "nesterov", "max_unorm", "min_8bit_size")
_BNB_LION = ("betas", "weight_decay", "min_8bit_size")


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


def _spec(name, module, attr, package, keys, description, **kw) -> OptimizerSpec:
    if not kw.get("eight_bit"):  # min_8bit_size means nothing for fp32 state
        keys = [k for k in keys if k != "min_8bit_size"]
    return OptimizerSpec(name, module, attr, package, tuple(keys), description, **kw)


_MOMENTUM_REQUIRED = {"momentum": 0.9}  # bitsandbytes SGD/LARS raise on momentum=0


def _build_registry() -> dict[str, OptimizerSpec]:
    specs = [
        _spec("adagrad", "torch.optim", "Adagrad", "torch", _TORCH_ADAGRAD, "PyTorch Adagrad"),
        _spec("adam", "torch.optim", "Adam", "torch", _TORCH_ADAM, "PyTorch Adam (L2 weight decay)"),
        _spec("adamw", "torch.optim", "AdamW", "torch", _TORCH_ADAM, "PyTorch AdamW, fp32 state"),
        _spec(
            "lamb", "bitsandbytes.optim", "LAMB", "bitsandbytes", _BNB_LAMB, "bitsandbytes LAMB, fp32 state"
        ),
        _spec(
            "lars",
            "bitsandbytes.optim",
            "LARS",
            "bitsandbytes",
            _BNB_LARS,
            "bitsandbytes LARS, fp32 state",
            defaults=_MOMENTUM_REQUIRED,
        ),
        _spec(
            "lion",
            "lion_pytorch",
            "Lion",
            "lion-pytorch",
            ("betas", "weight_decay", "use_triton", "decoupled_weight_decay"),
            "lucidrains' Lion, fp32 state",
            default_lr=1e-7,
        ),
        _spec("rmsprop", "torch.optim", "RMSprop", "torch", _TORCH_RMSPROP, "PyTorch RMSprop"),
        _spec("sgd", "torch.optim", "SGD", "torch", _TORCH_SGD, "PyTorch SGD"),
        # bitsandbytes 8-bit family: state tensors of >= min_8bit_size elements are uint8.
        _spec(
            "adagrad8bit",
            "bitsandbytes.optim",
            "Adagrad8bit",
            "bitsandbytes",
            _BNB_ADAGRAD,
            "bitsandbytes 8-bit Adagrad",
            eight_bit=True,
        ),
        _spec(
            "adam8bit",
            "bitsandbytes.optim",
            "Adam8bit",
            "bitsandbytes",
            (*_BNB_ADAM, "is_paged"),
            "bitsandbytes 8-bit Adam",
            eight_bit=True,
        ),
        _spec(
            "adamw8bit",
            "bitsandbytes.optim",
            "AdamW8bit",
            "bitsandbytes",
            (*_BNB_ADAM, "is_paged"),
            "bitsandbytes 8-bit AdamW (EveryDream2's default)",
            eight_bit=True,
        ),
        _spec(
            "lamb8bit",
            "bitsandbytes.optim",
            "LAMB8bit",
            "bitsandbytes",
            _BNB_LAMB,
            "bitsandbytes 8-bit LAMB",
            eight_bit=True,
        ),
        _spec(
            "lars8bit",
            "bitsandbytes.optim",
            "LARS8bit",
            "bitsandbytes",
            _BNB_LARS,
            "bitsandbytes 8-bit LARS",
            eight_bit=True,
            defaults=_MOMENTUM_REQUIRED,
        ),
        _spec(
            "lion8bit",
            "bitsandbytes.optim",
            "Lion8bit",
            "bitsandbytes",
            (*_BNB_LION, "is_paged"),
            "bitsandbytes 8-bit Lion",
            eight_bit=True,
            default_lr=1e-7,
        ),
        _spec(
            "rmsprop8bit",
            "bitsandbytes.optim",
            "RMSprop8bit",
            "bitsandbytes",
            _BNB_RMSPROP,
            "bitsandbytes 8-bit RMSprop",
            eight_bit=True,
        ),
        _spec(
            "sgd8bit",
            "bitsandbytes.optim",
            "SGD8bit",
            "bitsandbytes",
            _BNB_SGD,
            "bitsandbytes 8-bit SGD with momentum",
            eight_bit=True,
            defaults=_MOMENTUM_REQUIRED,
        ),
        # Paged variants: state in CUDA unified memory, evicted to CPU RAM under VRAM pressure.
        _spec(
            "paged_adam",
            "bitsandbytes.optim",
            "PagedAdam",
            "bitsandbytes",
            _BNB_ADAM,
            "bitsandbytes paged Adam, fp32 state",
        ),
        _spec(
            "paged_adamw",
            "bitsandbytes.optim",
            "PagedAdamW",
            "bitsandbytes",
            _BNB_ADAM,
            "bitsandbytes paged AdamW, fp32 state",
        ),
        _spec(
            "paged_adam8bit",
            "bitsandbytes.optim",
            "PagedAdam8bit",
            "bitsandbytes",
            _BNB_ADAM,
            "bitsandbytes paged 8-bit Adam",
            eight_bit=True,
        ),
        _spec(
            "paged_adamw8bit",
            "bitsandbytes.optim",
            "PagedAdamW8bit",
            "bitsandbytes",
            _BNB_ADAM,
            "bitsandbytes paged 8-bit AdamW",
            eight_bit=True,
        ),
        _spec(
            "paged_lion",
            "bitsandbytes.optim",
            "PagedLion",
            "bitsandbytes",
            _BNB_LION,
            "bitsandbytes paged Lion, fp32 state",
            default_lr=1e-7,
        ),
        _spec(
            "paged_lion8bit",
            "bitsandbytes.optim",
            "PagedLion8bit",
            "bitsandbytes",
            _BNB_LION,
            "bitsandbytes paged 8-bit Lion",
            eight_bit=True,
            default_lr=1e-7,
        ),
        # D-Adaptation: lr is a multiplier (1.0) on the estimated step size d.
        _spec(
            "dadapt_adam",
            "dadaptation",
            "DAdaptAdam",
            "dadaptation",
            (
                "betas",
                "epsilon",
                "weight_decay",
                "d0",
                "growth_rate",
                "decouple",
                "use_bias_correction",
                "log_every",
            ),
            "D-Adaptation Adam",
            default_lr=1.0,
            defaults={"decouple": True},
            adaptive=True,
            uses_log_every=True,
        ),
        _spec(
            "dadapt_lion",
            "dadaptation",
            "DAdaptLion",
            "dadaptation",
            ("betas", "weight_decay", "d0", "log_every"),
            "D-Adaptation Lion",
            default_lr=1.0,
            adaptive=True,
            uses_log_every=True,
        ),
        _spec(
            "dadapt_sgd",
            "dadaptation",
            "DAdaptSGD",
            "dadaptation",
            ("momentum", "weight_decay", "d0", "growth_rate", "log_every"),
            "D-Adaptation SGD",
            default_lr=1.0,
            adaptive=True,
            uses_log_every=True,
        ),
        _spec(
            "dadapt_adan",
            "dadaptation",
            "DAdaptAdan",
            "dadaptation",
            ("betas", "epsilon", "weight_decay", "no_prox", "d0", "growth_rate", "log_every"),
            "D-Adaptation Adan (betas has 3 values)",
            default_lr=1.0,
            adaptive=True,
            betas_len=3,
            uses_log_every=True,
        ),
        _spec(
            "dadapt_adagrad",
            "dadaptation",
            "DAdaptAdaGrad",
            "dadaptation",
            ("momentum", "epsilon", "weight_decay", "d0", "growth_rate", "log_every"),
            "D-Adaptation AdaGrad",
            default_lr=1.0,
            adaptive=True,
            uses_log_every=True,
        ),
        _spec(
            "prodigy",
            "prodigyopt",
            "Prodigy",
            "prodigyopt",
            (
                "betas",
                "beta3",
                "epsilon",
                "weight_decay",
                "decouple",
                "use_bias_correction",
                "safeguard_warmup",
                "d0",
                "d_coef",
                "growth_rate",
                "slice_p",
            ),
            "Prodigy (D-Adaptation successor)",
            default_lr=1.0,
            defaults={"use_bias_correction": True, "safeguard_warmup": True},
            adaptive=True,
        ),
        _spec(
            "adafactor",
            "transformers.optimization",
            "Adafactor",
            "transformers",
            (
                "epsilon",
                "eps2",
                "clip_threshold",
                "decay_rate",
                "beta1",
                "weight_decay",
                "scale_parameter",
                "relative_step",
                "warmup_init",
            ),
            "Adafactor (transformers); adaptive (relative_step) or constant mode",
        ),
        *modern_specs(_spec),
    ]
    return {s.name: s for s in specs}


REGISTRY: dict[str, OptimizerSpec] = _build_registry()


def normalize_name(name: str) -> str:
    """Case-insensitive, and OneTrainer/kohya spellings (`AdamW_8bit`, `ADAMW-8BIT`) map to ours."""
    key = name.strip().lower()
    if is_bridge_name(key):  # pytorch-optimizer's own names, lower-cased as its loader does
        return key
    key = key.replace("-", "_")
    return key.replace("_8bit", "8bit")


def get_spec(name: str, where: str = "optimizer") -> OptimizerSpec:
    """Look up an optimizer by name; an unknown name lists all names and the closest one.

    `pytorch_optimizer.<Name>` builds its spec from that class (imports pytorch-optimizer)."""
    if is_bridge_name(name):
        return bridge_spec(name, where, _spec)
    key = normalize_name(name)
    if key in REGISTRY:
        return REGISTRY[key]
    close = difflib.get_close_matches(key, list(REGISTRY), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"{where}: unknown optimizer '{name}'.{hint} Known optimizers: {', '.join(sorted(REGISTRY))}, "
        f"and pytorch_optimizer.<Name> for any optimizer of the pytorch-optimizer package."
    )


def is_adafactor_adaptive(spec: OptimizerSpec, options: dict[str, Any]) -> bool:
    """Adafactor with relative_step (its default) computes its own LR and ignores ours."""
    return spec.name == "adafactor" and options.get("relative_step", True)


def build_optimizer(
    spec: OptimizerSpec, params: Iterable[torch.nn.Parameter], lr: float | None, options: dict[str, Any]
) -> torch.optim.Optimizer:
    """Construct the optimizer from resolved user-level options (JSON key names).

    `options` has already been validated against `spec.keys` and merged with `spec.defaults`.
    Library ValueErrors (betas out of range, momentum 0 for bitsandbytes SGD, ...) are user
    errors and come back as ConfigError.
    """
    cls = without_host_syncs(spec, spec.load_class())  # same updates, no per-parameter host sync
    kwargs = {_RENAMES.get(k, k): v for k, v in options.items()}
    if prefer_fused_kernel(spec, options):
        kwargs["fused"] = True
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    if spec.name == "adafactor":
        kwargs["eps"] = (kwargs.pop("eps", 1e-30), kwargs.pop("eps2", 1e-3))
        lr = None if is_adafactor_adaptive(spec, options) else lr
    try:
        return cls(list(params), lr=lr, **kwargs)
    except (ValueError, NotImplementedError, TypeError) as exc:
        raise ConfigError(
            f"optimizer '{spec.name}' rejected its settings {options} (lr={lr}): {exc}"
        ) from exc


def prefer_fused_kernel(spec: OptimizerSpec, options: dict[str, Any]) -> bool:
    """Use PyTorch's fused (single-kernel) implementation when the optimizer has one and the user
    chose neither `fused` nor `foreach`: the same update with far fewer kernel launches on CUDA,
    and on CPU one vectorised pass instead of a loop of tensor ops (AdamW over the tiny models'
    4.9M parameters: 8 ms against 27 ms; docs/PERFORMANCE.md, "Second pass" of the kohya
    comparison)."""
    return (
        spec.module == "torch.optim"
        and "fused" in spec.keys
        and options.get("fused") is None
        and options.get("foreach") is None
    )


def closest_key(key: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None
