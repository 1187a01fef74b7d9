"""bench/gpu_suite.py --dry-run: both phases end to end on CPU with tiny models (issues 18, 32).

The suite runs in a subprocess as on the GPU machine (its phase timer is a process signal), one
torch thread, sleeping OpenMP waits: the machine's two cores are shared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT

SUITE = [sys.executable, str(ROOT / "bench" / "gpu_suite.py")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def _suite(tmp_path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    done = subprocess.run(
        [*SUITE, "--dry-run", "--out", str(out), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    phase = args[args.index("--phase") + 1]
    report = json.loads((out / f"gpu_suite_phase{phase}.json").read_text())
    table = (out / f"gpu_suite_phase{phase}.md").read_text()
    assert table.count("\n| ") == 1 + len(report["measurements"]) and "DRY RUN" in table
    return done, report


def _rows(report: dict, section: str) -> dict[str, dict]:
    return {m["name"]: m for m in report["measurements"] if m["section"] == section}


def test_phase1_dry_run_reports_every_cuda_test(tmp_path):
    done, report = _suite(tmp_path, "--phase", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["status"] == "finished" and report["ok"] and report["plan"]["estimate_s"] > 0
    tests = {n: m for n, m in _rows(report, "correctness").items() if "::" in n}
    total = _rows(report, "correctness")["pytest -m cuda (total)"]
    assert len(tests) == sum(total["counts"].values()) > 0  # one row per collected test, none dropped
    assert any("test_cuda_paging.py::" in n for n in tests)
    if not torch.cuda.is_available():  # here: every cuda test is skipped, and says why
        assert {m["status"] for m in tests.values()} == {"skipped"}
        assert all("needs a CUDA GPU" in m["summary"] for m in tests.values())
    else:
        assert {m["status"] for m in tests.values()} <= {"passed", "skipped", "expected failure"}
    assert _rows(report, "cache")["builtin cache: tiny-sd1, tiny-sd2"]["status"] == "done"


def test_a_pytest_timeout_is_a_row_and_the_suite_goes_on(tmp_path):
    """Issue 32: `subprocess.TimeoutExpired` of the test part aborted the whole suite, and no
    JSON was written (`--dry-run --test_timeout 1` showed it)."""
    done, report = _suite(tmp_path, "--phase", "1", "--test_timeout", "1")
    assert done.returncode == 1  # a timeout is a failure of the suite ...
    row = _rows(report, "correctness")["pytest -m cuda"]
    assert row["status"] == "timed out" and row["tail"] is not None
    assert report["status"] == "finished" and "cache" in {m["section"] for m in report["measurements"]}


def test_the_phase_deadline_stops_it_with_a_valid_report(tmp_path):
    """The phase timer ends a part that is still running (here a build or a training run) and
    the report says where it stopped."""
    done, report = _suite(tmp_path, "--phase", "2", "--deadline", "5")
    assert report["status"] == "finished" and report["measurements"][-1]["status"] == "deadline"
    assert 5 <= report["elapsed_s"] < 20


@pytest.mark.slow  # about a minute on two cores: CI runs it in its slow step, keeping the default suite short
def test_phase2_dry_run_measures_every_part(tmp_path):
    done, report = _suite(tmp_path, "--phase", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["status"] == "finished" and report["ok"]
    rows = {m["name"]: m for m in report["measurements"]}
    assert list(rows) == report["plan"]["rows"]  # every planned part has its row, in order
    for name in ("unet_cached", "full_finetune_pixels"):
        result = rows[name]["result"]
        assert rows[name]["status"] == "measured" and result["model_flops_per_image"] > 0
    assert rows["full_finetune_pixels"]["result"]["trained"].keys() == {"unet", "text_encoder"}
    assert rows["unet_cached"]["result"]["trained"].keys() == {"unet"}
    # every timing of the first build was made on it: one build, one argv
    first = [m for m in report["measurements"] if m.get("build") == "unet_cached"]
    assert len(first) == 7 and len({json.dumps(m["argv"]) for m in first}) == 1
    memory = _rows(report, "memory")
    assert len(memory) == 5 and all(m["status"] == "measured" for m in memory.values())
    for row in memory.values():  # the peak covers a sample, a validation pass and a save
        assert row["steps"] == 2 and row["samples"] >= 1 and row["validated"] and row["checkpoints"] == 1
    lowvram = memory["8 GB, SD1.5 512 px"]["config"]
    assert lowvram["fused_back_pass"] and lowvram["weight_dtype"] == "bf16" and lowvram["cache_latents"]
    assert memory["SD2.1-v 768 px"]["settings"]["resume_ckpt"] == "builtin:tiny-sd2"
    ratios = [m["ratio"] for m in report["measurements"] if m.get("ratio") is not None]
    assert len(ratios) >= 8 and all(r > 0 for r in ratios)
    assert rows["compile (inductor)"]["status"] == "measured"
    assert report["measurements"][-1]["name"] == "compile (inductor)"  # compile last


def test_a_kill_after_the_first_measurement_leaves_a_valid_report(tmp_path):
    """SIGKILL as soon as the first measurement is on disk: the JSON left is complete and
    holds it (written atomically after every measurement, not once at the end)."""
    out = tmp_path / "out"
    path = out / "gpu_suite_phase2.json"
    proc = subprocess.Popen(
        [*SUITE, "--dry-run", "--phase", "2", "--out", str(out)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and json.loads(path.read_text())["measurements"]:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    report = json.loads(path.read_text())
    assert report["status"] == "running"  # killed mid-phase ...
    first = report["measurements"][0]  # ... with what it had measured
    assert first["name"] == "unet_cached" and first["status"] == "measured"
    assert first["result"]["seconds_per_step_median"] > 0


def test_a_dropped_fused_build_is_freed(monkeypatch):
    """Issue 32: the old `measure()` emptied the CUDA cache after dropping a build; a fused back
    pass build was not freed by that, nor by `gc.collect()`: its hooks close a reference cycle
    through C++ that the collector cannot see, so its weights stayed in every later peak. The
    suite removes the hooks, collects, then empties the cache."""
    import gc
    import weakref

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from gpu_recipes import free_device_memory, release_fused_hooks
    from step import build, build_parser

    argv = ["--model", "builtin:tiny-sd1", "--resolution", "64", "--optimizer", "adamw", "--device", "cpu"]
    bench = build(build_parser().parse_args([*argv, "--fused_backward", "--cache_latents"]))
    weight, optim = weakref.ref(bench.model.unet.conv_in.weight), bench.optim
    del bench
    gc.collect()
    assert weight() is not None  # what the old measure() left behind, even with gc.collect()
    release_fused_hooks(optim)
    del optim
    free_device_memory(torch.device("cpu"))
    assert weight() is None
