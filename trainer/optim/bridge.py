"""`pytorch_optimizer.<Name>`: any optimizer of the pytorch-optimizer collection, by name.

Why a bridge rather than ~130 table rows: the collection grows every release. Its accepted JSON
keys are read from the class's constructor signature, so a misspelled key is still an error
with the closest match (many of its classes take `**kwargs` and would swallow it silently).
`eps` is spelled `epsilon` in optimizer.json, as for every other optimizer (EveryDream2's files
always carry `epsilon`). Keyword arguments that take Python callables (ADOPT's `clip_lambda`)
cannot come from JSON and keep their default.
"""

from __future__ import annotations

import difflib
import importlib
import inspect

from trainer.runtime.errors import ConfigError, OptionalDependencyError

PREFIX = "pytorch_optimizer."
PACKAGE = "pytorch-optimizer"
_NOT_OPTIONS = {"self", "params", "lr"}


def is_bridge_name(name: str) -> bool:
    return name.strip().lower().startswith(PREFIX)


def bridge_spec(name: str, where: str, spec_factory):
    """The OptimizerSpec for `pytorch_optimizer.<Name>` (imports the package: only when chosen).

    `spec_factory` is `trainer.optim.spec.make_spec`; raises ConfigError for an unknown name, with the
    closest one, and OptionalDependencyError when the package is missing.
    """
    inner = name.strip()[len(PREFIX) :].lower()
    try:
        module = importlib.import_module("pytorch_optimizer")
    except ImportError as exc:
        raise OptionalDependencyError(
            f"{where}: optimizer '{name}' needs the pip package '{PACKAGE}', which failed to import ({exc}). "
            f"Install it with `pip install {PACKAGE}` or choose another optimizer."
        ) from exc
    known = sorted(module.get_supported_optimizers())
    if inner not in known:
        close = difflib.get_close_matches(inner, known, n=1, cutoff=0.5)
        hint = f" Did you mean '{PREFIX}{close[0]}'?" if close else ""
        raise ConfigError(
            f"{where}: pytorch-optimizer has no optimizer '{inner}'.{hint} Known: {', '.join(known)}."
        )
    try:
        cls = module.load_optimizer(inner)
    except ImportError as exc:  # bnb_* / q_galore_* / torchao_* need CUDA and more packages
        raise OptionalDependencyError(f"{where}: optimizer '{name}': {exc}") from exc
    keys, betas_len = [], 2
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name in _NOT_OPTIONS or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if callable(param.default):
            continue
        if param.name == "betas" and isinstance(param.default, tuple):
            betas_len = len(param.default)
        keys.append("epsilon" if param.name == "eps" else param.name)
    adaptive = "d0" in keys  # D-Adaptation / Prodigy family: lr multiplies the estimated d
    # The library's own default LRs are for small nets (1e-3); ours are for SD fine-tuning.
    return spec_factory(
        PREFIX + inner,
        cls.__module__,
        cls.__name__,
        PACKAGE,
        tuple(keys),
        f"pytorch-optimizer {cls.__name__}",
        default_lr=1.0 if adaptive else 1e-6,
        adaptive=adaptive,
        betas_len=betas_len,
        schedule_free=callable(getattr(cls, "eval", None)) and callable(getattr(cls, "train", None)),
    )
