"""Pin the GPU machine's wheels to the versions the CPU test suite ran against here.

The GPU machine's image lacks diffusers and the optimizer packages; a helper downloads their
wheels into `.whl/` (the launch carries that folder). It downloads the newest release of each,
which may not be the release this checkout was tested with: a diffusers release that changed
an attention processor or a loader would then fail, or measure, something CI never ran. This
script replaces the wheel of each pinned package in `.whl/` by the version installed in this
environment (or the one given), so the GPU runs the code the tests passed on.

    python bench/pin_wheels.py                       # diffusers at this environment's version
    python bench/pin_wheels.py diffusers==0.42.1     # an explicit version
    python bench/pin_wheels.py --dry-run             # say what would change

Downloads for the GPU image's Python (3.12, x86-64 manylinux), like the helper; needs network.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("diffusers",)  # the library whose API the trainer follows most closely
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]


def wheel_project_version(name: str) -> tuple[str, str] | None:
    """(normalised project, version) of a wheel file name, None for anything else."""
    match = re.match(r"^([A-Za-z0-9_.]+)-([^-]+)-.*\.whl$", name)
    if match is None:
        return None
    return normalise(match.group(1)), match.group(2)


def normalise(project: str) -> str:
    return re.sub(r"[-_.]+", "_", project).lower()


def wanted_versions(requests: list[str]) -> dict[str, str]:
    """project -> version: each `name==version` request, else this environment's version of
    every package in PINNED (refused when it is not installed here: nothing to pin to)."""
    pins: dict[str, str] = {}
    for request in requests:
        name, sep, version = request.partition("==")
        if not sep or not version:
            raise SystemExit(f"pin_wheels: '{request}' is not NAME==VERSION")
        pins[normalise(name)] = version
    if requests:
        return pins
    for name in PINNED:
        try:
            pins[normalise(name)] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(
                f"pin_wheels: {name} is not installed here; install the test extra first "
                f"(pip install -e '.[test]') or give {name}==VERSION"
            ) from None
    return pins


def plan_changes(files: list[str], pins: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Wheels to delete (a pinned project at another version) and pins still to download."""
    stale, present = [], set()
    for name in files:
        parsed = wheel_project_version(name)
        if parsed is None or parsed[0] not in pins:
            continue
        if parsed[1] == pins[parsed[0]]:
            present.add(parsed[0])
        else:
            stale.append(name)
    return sorted(stale), {p: v for p, v in pins.items() if p not in present}


def download(project: str, version: str, folder: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *TARGET, *platforms, "-d", str(folder),
         f"{project}=={version}"],
        check=True,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pins", nargs="*", metavar="NAME==VERSION")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the folder of wheels (.whl/)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    pins = wanted_versions(args.pins)
    folder: Path = args.wheels
    files = sorted(p.name for p in folder.glob("*.whl")) if folder.is_dir() else []
    stale, missing = plan_changes(files, pins)
    for name in stale:
        print(f"{'would remove' if args.dry_run else 'removing'} {name}")
        if not args.dry_run:
            (folder / name).unlink()
    for project, version in sorted(missing.items()):
        print(f"{'would download' if args.dry_run else 'downloading'} {project}=={version}")
        if not args.dry_run:
            folder.mkdir(parents=True, exist_ok=True)
            download(project, version, folder)
    print("pinned: " + ", ".join(f"{p}=={v}" for p, v in sorted(pins.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
