"""Test-wide settings: offline, a shared built-in model cache, CPU threads kept small."""

import os
import shutil

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Two pytest-xdist workers share 2 cores: one torch thread each, and OpenMP threads that sleep
# rather than spin at barriers (spinning starves the other worker; see trainer/runtime/threads.py).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory) -> str:
    """The built-in model cache shared by this test session (and its subprocesses).

    In pytest's temporary folder, so a killed test run (`timeout`, Ctrl-C) leaves it where pytest
    prunes old runs itself; removed at the end of a session that finishes (the full-size slow
    test writes GBs here). A cache given in $SDTRAINER_CACHE is used and kept as it is."""
    if "SDTRAINER_CACHE" in os.environ:
        yield os.environ["SDTRAINER_CACHE"]
        return
    path = tmp_path_factory.mktemp("sdtrainer-cache")
    os.environ["SDTRAINER_CACHE"] = str(path)
    yield str(path)
    del os.environ["SDTRAINER_CACHE"]
    shutil.rmtree(path, ignore_errors=True)
