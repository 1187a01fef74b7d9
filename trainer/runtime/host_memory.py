"""Host memory: keep freed blocks in the process instead of handing them back to the kernel.

Why this exists: a training step allocates and frees the same large activations every step. With
glibc's default malloc, blocks above its (moving) mmap threshold are mapped and unmapped each
time, and freed memory at the top of the heap is trimmed; the next step then touches fresh pages
and the kernel zeroes each 4 KiB page in a fault. Measured on the tiny model's full step (256 px,
batch 4, 2 cores; docs/PERFORMANCE.md, "What the defaults already do"): 35,000 page
faults and 0.08 s of system time per step by default, about 200 faults and 0.01 s with the
settings below.

The settings (glibc's `mallopt`, applied once at start-up, effective for every later allocation):

* `M_MMAP_THRESHOLD` = 32 MiB, the largest glibc allows: smaller blocks come from the heap, and
  setting it turns off the threshold's adjustment to the last freed block.
* `M_TRIM_THRESHOLD` = 1 GiB: freed memory at the top of a heap stays mapped up to that much.
* `M_TOP_PAD` = 64 MiB: the heap grows in large steps.

The cost: up to 1 GiB of freed heap stays in the process (blocks of 32 MiB and more, such as a
checkpoint's tensors after they moved to the GPU, still go back at once). A training step
reaches the same peak every step, so what stays is what the next step uses again.

Left alone when the user chose an allocator: any `MALLOC_*_` variable or `GLIBC_TUNABLES` with
`glibc.malloc` settings, or a preloaded jemalloc, tcmalloc or mimalloc (`LD_PRELOAD`); not on
glibc (musl, macOS, Windows). `SDTRAINER_HOST_MEMORY=default` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass

from trainer.runtime.errors import ConfigError

ENV = "SDTRAINER_HOST_MEMORY"
# mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass(frozen=True)
class HostMemoryPlan:
    keep_freed: bool
    reason: str

    def summary(self) -> str:
        if self.keep_freed:
            return (
                f"host memory: freed blocks kept in the process ({self.reason}; {ENV}=default turns it off)"
            )
        return f"host memory: the allocator's defaults ({self.reason})"


def plan_host_memory(environ: Mapping[str, str], libc: str) -> HostMemoryPlan:
    """Pure: whether to apply the settings, given the environment and the C library's name
    (`platform.libc_ver()[0]`: "glibc" where they exist)."""
    value = environ.get(ENV, "auto").strip().lower()
    if value not in ("auto", "default"):
        raise ConfigError(
            f"environment variable {ENV}={environ.get(ENV)!r} is not valid: use 'auto' (the default: "
            "keep freed memory for the next step) or 'default' (the C library's own behaviour)"
        )
    if value == "default":
        return HostMemoryPlan(False, f"{ENV}=default")
    if libc != "glibc":
        return HostMemoryPlan(False, f"C library {libc or 'unknown'}, not glibc")
    preload = environ.get("LD_PRELOAD", "")
    if chosen := next((a for a in _OTHER_ALLOCATORS if a in preload), None):
        return HostMemoryPlan(False, f"{chosen} preloaded")
    if user := sorted(k for k in environ if k.startswith("MALLOC_") and k.endswith("_")):
        return HostMemoryPlan(False, f"{', '.join(user)} set")
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return HostMemoryPlan(False, "GLIBC_TUNABLES sets glibc.malloc")
    return HostMemoryPlan(True, "auto")


def configure_host_memory(environ: Mapping[str, str] | None = None) -> HostMemoryPlan:
    """Apply the plan to this process (the CLI calls it once, at start-up, and logs its summary
    in the run's train.log)."""
    plan = plan_host_memory(os.environ if environ is None else environ, platform.libc_ver()[0])
    if plan.keep_freed:
        mallopt = ctypes.CDLL(None).mallopt
        refused = [param for param, value in SETTINGS if mallopt(param, value) != 1]
        if refused:  # mallopt returns 1 on success; an older glibc may refuse a value
            plan = HostMemoryPlan(True, f"auto, but glibc refused mallopt parameter(s) {refused}")
    return plan
