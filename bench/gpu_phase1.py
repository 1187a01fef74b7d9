"""Phase 1 of the GPU suite: correctness on CUDA (`pytest -m cuda`), one row per test.

The cuda-marked tests (tests/test_cuda.py: every 8-bit and paged optimizer with a state round
trip, fp16 + GradScaler, bf16, attention kernels, inductor compile, exact resume;
tests/test_cuda_paging.py: paged optimizer state that stays paged across the trainer's resume,
on layers above bitsandbytes' paging threshold) run in a pytest subprocess whose verbose output
is read line by line: each test's outcome is a row of the report the moment it is printed, so
a kill or a timeout still returns every outcome so far. A timeout is recorded (with the tail of
the output), never raised: one slow test must not take the rest of the suite with it.

While the tests run, a second process builds the full-size built-in models into the on-disk
cache (random init + save: CPU work, ~40 s each), so phase 2 on the same machine only loads them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_report import Measurement, Report

ROOT = Path(__file__).resolve().parents[1]
CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/test_cuda_paging.py")
OUTCOME = re.compile(
    r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b\s*(.*?)\s*(\[\s*\d+%\])?$"
)
SUMMARY = re.compile(r"^(FAILED|ERROR) (tests/\S+::\S+)(?: - (.*))?$")
STATUS = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped"}
STATUS |= {"XFAIL": "expected failure", "XPASS": "failed"}  # strict xfail: a pass is a failure

# Per-unit costs of the H100 estimate (seconds). pytest start-up and imports; each tiny
# training of tests/test_cuda.py (build, 4-8 steps at 64 px, a save); the inductor compile of
# the tiny UNet; one optimizer round trip; the paging check (a 4M-element layer, a resume).
EST_PYTEST_START, EST_TINY_RUN, EST_TINY_COMPILE, EST_ROUND_TRIP, EST_PAGING = 15, 6, 45, 1, 10
TINY_RUNS = 10  # mixed precision x2, fp16 resume x2, attention x3, save/resume x3
ROUND_TRIPS = 14  # 8-bit and paged optimizers
CACHE_MODELS = {"full": ("sd15-arch", "sd21-arch"), "dry": ("tiny-sd1", "tiny-sd2")}


def plan(dry: bool) -> dict:
    """What phase 1 runs and its estimated H100 time (the cache build overlaps the tests)."""
    tests = EST_PYTEST_START + TINY_RUNS * EST_TINY_RUN + EST_TINY_COMPILE + ROUND_TRIPS * EST_ROUND_TRIP
    return {
        "parts": ["pytest -m cuda " + " ".join(CUDA_TEST_FILES), "builtin model cache (in parallel)"],
        "estimate_s": tests + EST_PAGING,
        "estimate_method": (
            f"pytest start {EST_PYTEST_START} s + {TINY_RUNS} tiny trainings x {EST_TINY_RUN} s + tiny "
            f"inductor compile {EST_TINY_COMPILE} s + {ROUND_TRIPS} optimizer round trips x "
            f"{EST_ROUND_TRIP} s + paging resume {EST_PAGING} s; the full-size cache build (~40 s per "
            "model, CPU) runs beside the tests"
        ),
    }


def run(report: Report, *, dry: bool, test_timeout: float, skip_tests: bool) -> None:
    builder = _start_cache_build(CACHE_MODELS["dry" if dry else "full"])
    try:
        if skip_tests:
            report.add(Measurement("correctness", "pytest -m cuda", "not run", summary="--skip-tests"))
        else:
            run_cuda_tests(report, timeout=min(test_timeout, max(report.remaining() - 5, 1)))
    finally:
        _finish_cache_build(report, builder)


def pytest_command() -> list[str]:
    """Verbose (one line per outcome), one process, fixed order; failure reasons at the end."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", *CUDA_TEST_FILES, "-v", "-n", "0"]
    return cmd + ["-p", "no:randomly", "-p", "no:cacheprovider", "-rfE", "--color=no"]


def run_cuda_tests(report: Report, *, timeout: float) -> None:
    """Each outcome a row as it is printed; a timeout kills the tests and is a row of its own."""
    cmd = pytest_command()
    started = last = time.monotonic()
    rows: dict[str, Measurement] = {}
    tail: list[str] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="1000")  # skip reasons not cut to fit a terminal
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for line in _lines_until(proc, started + timeout):
            tail = (tail + [line])[-40:]
            if (hit := OUTCOME.match(line)) is not None:
                node, outcome, reason = hit.group(1), hit.group(2), hit.group(3)
                row = Measurement("correctness", node, STATUS[outcome], time.monotonic() - last, reason)
                rows[node] = report.add(row)
                last = time.monotonic()
            elif (hit := SUMMARY.match(line)) is not None and hit.group(2) in rows:
                rows[hit.group(2)].summary = (hit.group(3) or "")[:300]
                report.write()
        timed_out = proc.poll() is None
    finally:
        _kill_group(proc)
    seconds = time.monotonic() - started
    counts = {s: sum(r.status == s for r in rows.values()) for s in {r.status for r in rows.values()}}
    data = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "counts": counts}
    if timed_out:
        text = f"timed out after {timeout:.0f} s with {len(rows)} outcomes; last output: {tail[-1] if tail else ''}"
        report.add(
            Measurement("correctness", "pytest -m cuda", "timed out", seconds, text, data | {"tail": tail})
        )
    elif not rows or proc.returncode not in (0, 1, 5):  # 5: nothing collected (no test marked cuda)
        text = f"pytest exited {proc.returncode} before reporting outcomes"
        report.add(
            Measurement("correctness", "pytest -m cuda", "error", seconds, text, data | {"tail": tail})
        )
    else:
        text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        report.add(Measurement("correctness", "pytest -m cuda (total)", "done", seconds, text, data))


def _lines_until(proc: subprocess.Popen, deadline: float):
    """The subprocess's output lines until it exits or `deadline` (time.monotonic) passes.

    A reader thread hands lines over, so the wait itself honours the deadline even while the
    child prints nothing (a hung CUDA call)."""
    import queue
    import threading

    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if line is None:
            proc.wait()
            return
        yield line


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the child and everything it started (its own session), if still running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _start_cache_build(names: tuple[str, ...]) -> tuple[subprocess.Popen, float, tuple[str, ...]]:
    code = "import sys; from trainer.models.builtin import ensure_cached; [ensure_cached(n) for n in sys.argv[1:]]"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *names],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return proc, time.monotonic(), names


def _finish_cache_build(report: Report, builder: tuple[subprocess.Popen, float, tuple[str, ...]]) -> None:
    """Wait for the cache build within the phase's time; unfinished, phase 2 builds what is missing."""
    proc, started, names = builder
    name = "builtin cache: " + ", ".join(names)
    try:
        _, stderr = proc.communicate(timeout=max(report.remaining() - 2, 1))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        text = "not finished within the phase's deadline: phase 2 builds what is missing"
        report.add(Measurement("cache", name, "not run", time.monotonic() - started, text))
        return
    status = "done" if proc.returncode == 0 else "failed"
    text = "built or found" if status == "done" else stderr[-500:]
    report.add(Measurement("cache", name, status, time.monotonic() - started, text))
