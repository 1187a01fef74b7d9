"""Test-wide settings: offline, a shared built-in model cache, CPU threads kept small."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "SDTRAINER_CACHE" not in os.environ:
    os.environ["SDTRAINER_CACHE"] = tempfile.mkdtemp(prefix="sdtrainer-test-cache-")
    # The full-size slow test writes GBs here; remove it when the session ends.
    atexit.register(shutil.rmtree, os.environ["SDTRAINER_CACHE"], True)


@pytest.fixture(scope="session")
def builtin_cache() -> str:
    """The built-in model cache shared by this test session (and its subprocesses)."""
    return os.environ["SDTRAINER_CACHE"]
