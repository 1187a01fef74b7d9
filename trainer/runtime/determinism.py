"""Bitwise-reproducible kernels on request (`deterministic` in train.json).

On CPU the trainer is already reproducible, so a run and its resume give identical weights. On
CUDA several kernels are not: cuDNN's autotuner (`cudnn.benchmark`) may pick a different
convolution algorithm per process, some cuDNN algorithms and atomics-based backward kernels
(e.g. index/scatter adds) sum in a varying order, and cuBLAS splits work over a workspace whose
reuse changes the reduction order. `deterministic: true` switches all of these to their
reproducible versions so that a GPU run and its resume can be bitwise equal. The cost is speed
(no cuDNN autotuning, slower deterministic kernels for some backward ops; how much depends on
the GPU and model) and a few MB of cuBLAS workspace per stream; an op with no deterministic
kernel at all raises an error naming it instead of running non-deterministically.

This is the one place that sets these backend flags. Speed defaults for CUDA (cuDNN benchmark,
TF32) belong beside it and must be applied *before* `configure_determinism`, so that
`deterministic: true` wins over them. TF32 is not touched: it is deterministic, only less
precise than fp32.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from trainer.runtime.errors import ConfigError

log = logging.getLogger(__name__)

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
# The two values cuBLAS documents for reproducible results (":16:8" uses less memory, is slower).
CUBLAS_DETERMINISTIC_VALUES = (":4096:8", ":16:8")


def configure_determinism(cfg) -> dict[str, object]:
    """Apply (or lift) deterministic kernels as `cfg.deterministic` says (cfg: a TrainConfig);
    returns the settings it made.

    Must run before the first CUDA operation: cuBLAS reads `CUBLAS_WORKSPACE_CONFIG` when its
    handle is created, so setting it later has no effect on that handle (a warning says so).
    `deterministic=False` turns torch's deterministic mode off again (a later run in the same
    process must not inherit it) and leaves cuDNN benchmark to the speed defaults.
    """
    deterministic = bool(cfg.deterministic)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    if not deterministic:
        return {"deterministic_algorithms": False}
    torch.backends.cudnn.benchmark = False
    value = os.environ.get(CUBLAS_ENV)
    if value is None:
        if torch.cuda.is_initialized():
            log.warning(
                "deterministic: CUDA was initialised before %s was set; cuBLAS may stay non-deterministic. "
                "Export %s=:4096:8 before starting the trainer.",
                CUBLAS_ENV,
                CUBLAS_ENV,
            )
        os.environ[CUBLAS_ENV] = CUBLAS_DETERMINISTIC_VALUES[0]
        value = CUBLAS_DETERMINISTIC_VALUES[0]
    elif value not in CUBLAS_DETERMINISTIC_VALUES:
        raise ConfigError(
            f"deterministic: true, but the environment sets {CUBLAS_ENV}={value!r}, which cuBLAS does not "
            f"make reproducible; unset it or use one of {', '.join(CUBLAS_DETERMINISTIC_VALUES)}"
        )
    settings = {
        "deterministic_algorithms": True,
        "cudnn.deterministic": True,
        "cudnn.benchmark": False,
        CUBLAS_ENV: value,
    }
    log.info("deterministic kernels: %s", ", ".join(f"{k}={v}" for k, v in settings.items()))
    return settings


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block (sampling, validation) without moving any global generator the run depends on.

    Forks the CPU generator and every visible CUDA device's, so the block's draws are undone on
    exit and a run with samples or validation on trains bitwise like one without.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
