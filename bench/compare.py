"""Compare training-step settings side by side, with ratios against the first variant.

    python bench/compare.py --resolution 128 --batch_size 4 \
        --variant "baseline=" --variant "latents=--cache_latents" \
        --variant "latents+text=--cache_latents --cache_text"

Every option of bench/step.py before the first --variant is common to all variants; each
`--variant NAME=FLAGS` adds its own bench/step.py flags. Variants run one after another in this
process (each with a freshly loaded model), so on a GPU the CUDA peak-memory figures are clean
(reset per variant). CPU peak RSS is not: freed memory stays in the process, so pass
`--isolate` to run each variant in its own subprocess when comparing CPU memory. Timings on a
shared machine are noisy: use --steps >= 5 and read the min/max next to the median.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step as step_bench  # noqa: E402  (bench/step.py, next to this file)


def parse_variants(values: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for value in values:
        name, sep, flags = value.partition("=")
        if not sep or not name:
            raise SystemExit(f"--variant {value!r}: use NAME=FLAGS, e.g. 'cached=--cache_latents'")
        out.append((name, shlex.split(flags)))
    return out


def run_variant(common: list[str], flags: list[str], isolate: bool) -> dict:
    argv = common + flags
    if not isolate:
        return step_bench.run_benchmark(step_bench.build_parser().parse_args(argv))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(step_bench.__file__)), *argv, "--json", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def _memory_figure(result: dict) -> float:
    mem = result["memory"]
    return mem.get("peak_rss_mib") or mem["cuda_peak_allocated_gib"] * 1024


def table(results: list[tuple[str, dict]]) -> str:
    base_name, base = results[0]
    head = (
        f"{'variant':<22} {'s/step':>9} {'min':>8} {'max':>8} {'img/s':>8} {'speed-up':>9} "
        f"{'peak MiB':>9} {'mem ratio':>9} {'GFLOP/img':>10}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results:
        speedup = base["seconds_per_step_median"] / r["seconds_per_step_median"]
        mem_ratio = _memory_figure(r) / _memory_figure(base)
        flops = r["model_tflops_per_image"]
        lines.append(
            f"{name:<22} {r['seconds_per_step_median']:>9.4f} {r['seconds_per_step_min']:>8.4f} "
            f"{r['seconds_per_step_max']:>8.4f} {r['images_per_s']:>8.2f} {speedup:>8.2f}x "
            f"{_memory_figure(r):>9.1f} {mem_ratio:>9.2f} {flops * 1e3 if flops is not None else float('nan'):>10.3f}"
        )
    lines.append(f"(speed-up and memory ratio against '{base_name}'; s/step = median of the timed steps)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME=bench/step.py flags")
    parser.add_argument("--isolate", action="store_true", help="each variant in its own process")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    own, common = parser.parse_known_args(argv)
    step_bench.build_parser().parse_args(common)  # fail early on a bad common flag
    results = []
    for name, flags in parse_variants(own.variant):
        print(f"running {name}: {' '.join(common + flags)}", file=sys.stderr, flush=True)
        results.append((name, run_variant(common, flags, own.isolate)))
    print(table(results))
    if own.json is not None:
        own.json.write_text(json.dumps({name: r for name, r in results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
