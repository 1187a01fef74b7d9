"""CPU thread settings, chosen once at start-up, before torch is imported.

Why this exists: on a busy machine the quick start ran 40-75x slower than idle while other
programs slowed about in proportion to the load. The torch CPU wheels use GNU OpenMP, whose
default is to *spin* at every barrier (hundreds of thousands of iterations) before sleeping,
and a training step of a small model is thousands of short parallel regions. With every core
shared, the spinning thread holds a core the other team thread (or another program) needs, and
each region then waits for a scheduler time slice instead of microseconds. The settings here:

* `OMP_WAIT_POLICY=PASSIVE` with `GOMP_SPINCOUNT=3000` (unless the user set either): a waiting
  thread spins briefly (about 30 microseconds), then sleeps and gives the core back. libgomp
  applies a wait policy's spin count only when `GOMP_SPINCOUNT` is unset, so this is a bounded
  spin. Measured on 2 cores (docs/PERFORMANCE.md, "CPU threads on a busy machine"): idle, the quick start's step
  took 0.17 s against 0.47-0.52 s with a pure sleep (0 spins) and 0.22 s with libgomp's default
  (300000 spins); with 8 busy processes beside it, 2.7 s against 2.2-2.3 s sleeping and 25 s at
  100000 spins (the default spins as long: the 40-75x slowdown users met). Both must be in the
  environment before torch loads libgomp, so `configure_threads` is called before the first
  `import torch` (the CLI does it right after reading the config).
* intra-op threads = the CPUs this process may run on (`os.sched_getaffinity`, not the machine's
  count: containers and `taskset` restrict it). Inter-op threads: 1 (the trainer issues no
  parallel graph work; torch's default starts one per core and they only compete).
* data-loader workers are single-threaded already (torch's worker loop sets one thread), so
  they add one process each, not a thread team.

`SDTRAINER_THREADS` overrides: a number of intra-op threads, `auto` (the default) or `torch`
(leave every torch/OpenMP default alone: the old behaviour, for comparison). An explicit
`OMP_NUM_THREADS` is respected as the intra-op count. The start-up summary logs the plan.
Thread counts change float summation order, so runs meant to be bitwise identical (exact
resume) need the same count: set `SDTRAINER_THREADS` when resuming on another machine.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from trainer.runtime.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "SDTRAINER_THREADS"
# Spins before a waiting OpenMP thread sleeps: fast idle, near a pure sleep under load (measured).
SPIN_COUNT = "3000"


@dataclass(frozen=True)
class ThreadPlan:
    """What `configure_threads` applies; None leaves torch's default."""

    cpus: int  # CPUs this process may run on
    intra_op: int | None
    interop: int | None
    wait_policy: str | None  # OMP_WAIT_POLICY in effect (None: libgomp's default, spinning)
    source: str  # why: "auto", "SDTRAINER_THREADS=...", "OMP_NUM_THREADS=..."
    spin_count: str | None = None  # GOMP_SPINCOUNT in effect (None: the wait policy's own)

    def summary(self) -> str:
        if self.intra_op is None:
            return f"threads: torch defaults ({self.source}), {self.cpus} CPU(s) available"
        spin = f", spin count {self.spin_count}" if self.spin_count is not None else ""
        return (
            f"threads: {self.intra_op} intra-op, {self.interop} inter-op, OpenMP wait policy "
            f"{self.wait_policy or 'default (spin)'}{spin}, {self.cpus} CPU(s) available ({self.source}; "
            f"override with {ENV}=N|auto|torch)"
        )


def available_cpus() -> int:
    """CPUs this process may run on (affinity mask), not the machine's core count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux: no affinity API
        return max(1, os.cpu_count() or 1)


def plan_threads(environ: Mapping[str, str], cpus: int) -> ThreadPlan:
    """Pure: the thread plan for `cpus` available CPUs and the environment's overrides.

    Processes of one data-parallel launch share the CPUs: each gets its share
    (`LOCAL_WORLD_SIZE`, set by torchrun / accelerate launch)."""
    value = environ.get(ENV, "auto").strip().lower()
    user_policy, user_spin = environ.get("OMP_WAIT_POLICY"), environ.get("GOMP_SPINCOUNT")
    if value == "torch":
        return ThreadPlan(cpus, None, None, user_policy, f"{ENV}=torch", user_spin)
    # The bounded spin only when the user chose neither (an explicit policy keeps its own count).
    wait = dict(
        wait_policy=user_policy or "PASSIVE", spin_count=user_spin or (None if user_policy else SPIN_COUNT)
    )
    if value == "auto":
        omp = environ.get("OMP_NUM_THREADS", "").strip()
        if omp.isdigit() and int(omp) > 0:
            return ThreadPlan(cpus, int(omp), 1, source=f"OMP_NUM_THREADS={omp}", **wait)
        local = environ.get("LOCAL_WORLD_SIZE", "1")
        share = max(1, cpus // int(local)) if local.isdigit() and int(local) > 0 else cpus
        return ThreadPlan(
            cpus, share, 1, source="auto" if share == cpus else f"auto, {local} local processes", **wait
        )
    if value.isdigit() and int(value) > 0:
        return ThreadPlan(cpus, int(value), 1, source=f"{ENV}={value}", **wait)
    raise ConfigError(
        f"environment variable {ENV}={environ.get(ENV)!r} is not valid: use a positive number of "
        "threads, 'auto' (the default: the CPUs this process may use) or 'torch' (torch's own defaults)"
    )


def configure_threads(environ: Mapping[str, str] | None = None) -> ThreadPlan | None:
    """Apply the plan to this process, before the first `import torch` (OpenMP reads its wait
    policy when it loads). When torch is already imported, the program that imported it (a
    test, a notebook) owns the thread settings: nothing is changed and None is returned."""
    environ = os.environ if environ is None else environ
    plan = plan_threads(environ, available_cpus())
    if "torch" in sys.modules:
        log.debug("torch already imported: thread settings left as they are")
        return None
    if plan.intra_op is None or plan.interop is None:  # torch's defaults (a plan sets both or neither)
        return plan
    if plan.wait_policy is not None:
        os.environ.setdefault("OMP_WAIT_POLICY", plan.wait_policy)
    if plan.spin_count is not None:
        os.environ.setdefault("GOMP_SPINCOUNT", plan.spin_count)
    import torch

    torch.set_num_threads(plan.intra_op)
    torch.set_num_interop_threads(plan.interop)  # a fresh process: the pool has not started yet
    return plan


def describe_threads() -> str:
    """The thread settings in effect in this process, for the start-up summary."""
    import torch

    return (
        f"threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op, "
        f"OpenMP wait policy {os.environ.get('OMP_WAIT_POLICY', 'default (spin)')}"
        f"{', spin count ' + os.environ['GOMP_SPINCOUNT'] if 'GOMP_SPINCOUNT' in os.environ else ''}, "
        f"{available_cpus()} CPU(s) available ({ENV}={os.environ.get(ENV, 'auto')})"
    )
