"""Host memory settings (trainer/runtime/host_memory.py): when they apply, and that they stop the page
faults a step's alloc/free churn causes."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.runtime.errors import ConfigError
from trainer.runtime.host_memory import plan_host_memory

ROOT = Path(__file__).resolve().parents[1]


def test_applies_on_glibc_by_default():
    assert plan_host_memory({}, "glibc").keep_freed


@pytest.mark.parametrize(
    ("environ", "libc", "why"),
    [
        ({"SDTRAINER_HOST_MEMORY": "default"}, "glibc", "SDTRAINER_HOST_MEMORY=default"),
        ({}, "", "not glibc"),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "glibc", "jemalloc preloaded"),
        ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "glibc", "tcmalloc preloaded"),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "glibc", "MALLOC_TRIM_THRESHOLD_ set"),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}, "glibc", "GLIBC_TUNABLES"),
    ],
)
def test_the_users_allocator_choice_is_left_alone(environ, libc, why):
    plan = plan_host_memory(environ, libc)
    assert not plan.keep_freed
    assert why in plan.reason


def test_an_invalid_setting_names_the_variable_and_the_choices():
    with pytest.raises(ConfigError, match=r"SDTRAINER_HOST_MEMORY='always'.*'auto'.*'default'"):
        plan_host_memory({"SDTRAINER_HOST_MEMORY": "always"}, "glibc")


CHURN = """
import resource, sys
if sys.argv[1] == "keep":
    from trainer.runtime.host_memory import configure_host_memory
    assert configure_host_memory({}).keep_freed
import torch
torch.manual_seed(0)
net = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.SiLU())])
x = torch.randn(2, 16, 128, 128)  # 2 MiB activations, allocated and freed every step
def step():
    net(x).square().mean().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def _faults_per_round(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_kept_memory_stops_most_page_faults_of_a_training_step():
    default, kept = _faults_per_round("default"), _faults_per_round("keep")
    assert default > 1000  # the step really faults by default (else the test proves nothing)
    assert kept * 5 < default, (default, kept)
