"""CPU thread settings: the plan (pure), and that train.py applies it before torch loads."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from trainer.runtime.errors import ConfigError
from trainer.runtime.threads import ThreadPlan, available_cpus, plan_threads


def test_auto_uses_the_available_cpus_one_interop_thread_and_a_bounded_spin():
    assert plan_threads({}, 2) == ThreadPlan(2, 2, 1, "PASSIVE", "auto", "3000")
    assert plan_threads({"LOCAL_WORLD_SIZE": "2"}, 8).intra_op == 4  # DDP ranks share the CPUs
    assert plan_threads({"LOCAL_WORLD_SIZE": "4"}, 2).intra_op == 1


def test_overrides_are_respected():
    assert plan_threads({"OMP_NUM_THREADS": "3"}, 8).intra_op == 3
    assert plan_threads({"SDTRAINER_THREADS": "5", "OMP_NUM_THREADS": "3"}, 8).intra_op == 5
    active = plan_threads({"OMP_WAIT_POLICY": "ACTIVE"}, 2)
    assert (active.wait_policy, active.spin_count) == ("ACTIVE", None)  # the user's policy, its own spin
    assert plan_threads({"GOMP_SPINCOUNT": "0"}, 2).spin_count == "0"
    torch_defaults = plan_threads({"SDTRAINER_THREADS": "torch"}, 2)
    assert torch_defaults.intra_op is None and torch_defaults.wait_policy is None
    assert "torch defaults" in torch_defaults.summary()


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_override_names_the_variable_and_the_choices(value):
    with pytest.raises(ConfigError, match=r"SDTRAINER_THREADS='?" + value + r".*auto.*torch"):
        plan_threads({"SDTRAINER_THREADS": value}, 2)


def _in_fresh_python(code: str, **env) -> str:
    keep = ("SDTRAINER_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # the test session's cache
    clean = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **{k: os.environ[k] for k in keep}, **env}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=clean,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()


def test_the_cli_imports_no_torch_before_configuring_threads():
    """The OpenMP wait policy only takes effect if it is set before torch loads libgomp."""
    assert _in_fresh_python("import sys, trainer.cli; print('torch' in sys.modules)") == "False"


def test_configure_threads_applies_the_plan_in_a_fresh_process():
    code = (
        "import os; from trainer.runtime.threads import configure_threads; configure_threads(); import torch; "
        "print(torch.get_num_threads(), torch.get_num_interop_threads(), os.environ['OMP_WAIT_POLICY'], "
        "os.environ.get('GOMP_SPINCOUNT'))"
    )
    assert _in_fresh_python(code) == f"{available_cpus()} 1 PASSIVE 3000"
    assert _in_fresh_python(code, SDTRAINER_THREADS="1", OMP_WAIT_POLICY="ACTIVE") == "1 1 ACTIVE None"


def test_train_cli_applies_the_thread_settings(tmp_path):
    """Through the real entry point: settings applied before torch loads (a run that then stops
    at its missing data_root, which is all this needs)."""
    config = tmp_path / "train.json"
    config.write_text('{"resume_ckpt": "builtin:tiny-sd1", "data_root": "%s"}' % (tmp_path / "missing"))
    code = (
        "import os, sys; from trainer.cli import main; "
        f"rc = main(['--config', {str(config)!r}, '--logdir', {str(tmp_path / 'logs')!r}]); import torch; "
        "print(rc, torch.get_num_threads(), torch.get_num_interop_threads(), os.environ.get('OMP_WAIT_POLICY'))"
    )
    rc, intra, interop, policy = _in_fresh_python(code).split()[-4:]
    assert rc != "0" and (intra, interop, policy) == (str(available_cpus()), "1", "PASSIVE")
