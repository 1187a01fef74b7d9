"""The GPU suite's report: every measurement written to JSON and markdown as soon as it is taken.

Why: a device machine is lent for minutes and a command past its limit returns nothing but what
it left on disk. So the report is rewritten after each measurement, atomically (a temporary
file, then `os.replace`): a kill at any moment leaves the previous complete JSON, never a torn
one. The phase's deadline lives here too: every part asks `remaining()` before it starts and
is recorded as not run when too little time is left, so a phase ends in time with what it has.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` in one step (readers see the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Measurement:
    """One row of the report: a part of the suite, its outcome and its figures."""

    section: str  # correctness, paging, throughput, memory, speed-up, compile, ...
    name: str
    status: str  # passed / failed / skipped / measured / not run / timed out / unsupported / ...
    seconds: float = 0.0
    summary: str = ""  # the markdown cell
    data: dict = field(default_factory=dict)  # every figure, settings, errors with tracebacks

    def as_dict(self) -> dict:
        return {
            "section": self.section,
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 2),
            "summary": self.summary,
            **self.data,
        }


BAD = {"failed", "error", "timed out"}


class Report:
    """The phase's results so far, on disk after each `add` (`<out>/gpu_suite_phase<N>.json|md`)."""

    def __init__(self, out: Path, *, phase: int, dry_run: bool, machine: dict, deadline_s: float, plan: dict):
        out.mkdir(parents=True, exist_ok=True)
        self.json_path = out / f"gpu_suite_phase{phase}.json"
        self.md_path = out / f"gpu_suite_phase{phase}.md"
        self.started = time.monotonic()
        self.deadline_s = deadline_s
        self.header = {
            "suite": "bench/gpu_suite.py",
            "phase": phase,
            "dry_run": dry_run,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine,
            "deadline_s": deadline_s,
            "plan": plan,  # what the phase will measure and its estimated time
        }
        self.measurements: list[Measurement] = []
        self.status = "running"
        self.write()

    def remaining(self) -> float:
        return self.deadline_s - (time.monotonic() - self.started)

    def add(self, measurement: Measurement) -> Measurement:
        self.measurements.append(measurement)
        self.write()
        return measurement

    def finish(self) -> bool:
        self.status = "finished"
        self.write()
        return self.ok()

    def ok(self) -> bool:
        return not any(m.status in BAD for m in self.measurements)

    def as_dict(self) -> dict:
        return {
            **self.header,
            "status": self.status,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "ok": self.ok(),
            "measurements": [m.as_dict() for m in self.measurements],
        }

    def write(self) -> None:
        report = self.as_dict()
        write_atomic(self.json_path, json.dumps(report, indent=2, default=str) + "\n")
        write_atomic(self.md_path, markdown(report) + "\n")


def markdown(report: dict) -> str:
    """One table: section, item, status, result (the same rows as the JSON, in order)."""
    m = report["machine"]
    title = "DRY RUN (CPU, tiny models: the numbers mean nothing) " if report["dry_run"] else ""
    lines = [
        f"gpu_suite phase {report['phase']} {title}{report['date']}, {m.get('gpu', m['device'])}, "
        f"torch {m['torch']}: {report['status']} after {report['elapsed_s']} s "
        f"(deadline {report['deadline_s']:.0f} s, estimated {report['plan']['estimate_s']:.0f} s on an H100)",
        "",
        "| section | item | status | result |",
        "|---|---|---|---|",
    ]
    for row in report["measurements"]:
        cell = row["summary"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {row['section']} | {row['name']} | {row['status']} | {cell} |")
    return "\n".join(lines)
