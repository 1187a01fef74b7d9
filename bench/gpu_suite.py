"""Everything a CPU cannot check, checked and measured on a CUDA GPU in two commands.

    python bench/gpu_suite.py --phase 1 --out gpu1     # CUDA tests and correctness
    python bench/gpu_suite.py --phase 2 --out gpu2     # throughput, speed-ups, memory rows, compile
    python bench/gpu_suite.py --phase 1 --dry-run --out DIR   # the same on CPU with tiny models (CI)

Why two phases with deadlines: a GPU is lent for 15 minutes in all, machine start included,
and one command may run 10. Each phase is made to end within `--deadline` (270 s by default:
with start-up, under 5 minutes on an H100; the report's `plan` gives the estimate and how it
was made) and returns what it measured by
then. Every measurement rewrites `<out>/gpu_suite_phase<N>.json` and `.md` atomically, so a
kill at any moment leaves a valid report of everything measured until then; at the deadline a
timer stops the phase between two Python statements and the report says so.

* Phase 1 (bench/gpu_phase1.py): `pytest -m cuda` (tests/test_cuda.py, tests/test_cuda_paging.py),
  one row per test as it finishes; a timeout is a row, not a crash. Meanwhile the full-size
  built-in models are built into the on-disk cache for phase 2.
* Phase 2 (bench/gpu_phase2.py, bench/gpu_recipes.py): images/s and MFU of SD1.5 at 512 px,
  batch 8 (UNet on cached latents and text; full fine-tune), the memory rows of
  docs/REAL_MODELS.md section 5 with peaks over a real run (first step, a sample, validation,
  a save), on/off speed-ups, and compile last under its own deadline.

Exit status 1 when a test or a measurement failed (each failure is a row with its error).
The dry run uses tiny built-in models at 64 px and one step per timing: its numbers mean
nothing, it proves the wiring.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_phase1  # noqa: E402
import gpu_phase2  # noqa: E402
import step as step_bench  # noqa: E402
from gpu_report import Measurement, Report  # noqa: E402

DEFAULT_DEADLINE = 270.0  # s per phase: with Python's and torch's start-up (~15 s), under 5 minutes


class DeadlineExceeded(BaseException):
    """Raised by the phase timer; a BaseException so no part's `except Exception` records it
    as that part's failure: it ends the phase."""


def _on_deadline(signum, frame) -> None:
    raise DeadlineExceeded


def run_phase(args: argparse.Namespace) -> Report:
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device; run with --dry-run on CPU")
    device = torch.device("cpu" if dry else "cuda")
    module = gpu_phase1 if args.phase == 1 else gpu_phase2
    report = Report(
        args.out,
        phase=args.phase,
        dry_run=dry,
        machine=step_bench.machine_info(device),
        deadline_s=args.deadline,
        plan=module.plan(dry),
    )
    signal.signal(signal.SIGALRM, _on_deadline)
    signal.setitimer(signal.ITIMER_REAL, max(report.remaining(), 0.1))
    try:
        if args.phase == 1:
            gpu_phase1.run(report, dry=dry, test_timeout=args.test_timeout, skip_tests=args.skip_tests)
        else:
            with tempfile.TemporaryDirectory(prefix="gpu_suite-") as work:
                gpu_phase2.run(
                    report,
                    dry=dry,
                    peak_tflops=None if dry else args.peak_tflops,
                    compile_deadline=args.compile_deadline,
                    work=Path(work),
                )
    except DeadlineExceeded:
        text = f"the phase's deadline of {args.deadline:.0f} s passed: the parts above are what it measured"
        report.add(Measurement("suite", "deadline", "deadline", args.deadline, text))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    report.finish()
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", type=int, choices=(1, 2), required=True, help="1: tests; 2: measurements")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, one step per timing (CI)")
    p.add_argument("--out", type=Path, default=Path("gpu_suite"), help="folder for the JSON and markdown")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, help="seconds the phase may take")
    p.add_argument(
        "--peak_tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)"
    )
    p.add_argument("--skip-tests", action="store_true", help="phase 1 without pytest -m cuda")
    p.add_argument("--test_timeout", type=float, default=240, help="seconds for pytest -m cuda (phase 1)")
    p.add_argument(
        "--compile_deadline", type=float, default=100, help="seconds for the compile measurement (phase 2)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    report = run_phase(args)
    print(report.md_path.read_text())
    print(f"{time.monotonic() - started:.0f} s; wrote {report.json_path} and {report.md_path}")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
