"""Everything a CPU cannot check, checked and measured on a CUDA GPU in one call.

    python bench/gpu_suite.py --out gpu_suite          # on the GPU machine (docs/PERFORMANCE.md)
    python bench/gpu_suite.py --dry-run --out gpu_suite_out    # the same on CPU with tiny models (CI)

Writes `<out>/gpu_suite.json` and `<out>/gpu_suite.md` (one markdown table) and exits 1 when a
correctness test or a measurement failed (each failure is recorded with its error; the other
parts still run). Parts:

1. correctness: `pytest -m cuda` (tests/test_cuda.py: 8-bit and paged optimizers, fp16 +
   GradScaler, bf16, attention choices, compile, exact resume); on CPU every test is skipped
   and counted as skipped.
2. throughput: `builtin:sd15-arch`, 512 px, batch 8, bf16: UNet trained on cached latents and
   text (the MLPerf-like figure), and the full fine-tune (text encoder trained, pixels encoded
   each step); images/s and MFU from FLOPs counted by bench/step.py.
3. memory: peak VRAM of examples/train/lowvram_sd15.json and of the default recipe
   (train.json + optimizer.json) at their own resolution and batch size.
4. speed-ups, each on/off in the same process as a ratio to its baseline: compile,
   channels_last, fused optimizer kernels, SDPA kernels, TF32, and the stalls of issue 22
   item 8 (bitsandbytes' per-parameter sync against fused AdamW, EMA on the host against the
   device, stochastic rounding chunked against all at once).

The dry run uses `builtin:tiny-sd1` at 64 px, one timed step per variant and the `eager`
compile backend, so it proves the script end to end in well under a minute; its numbers mean
nothing. Budget on an H100/H200: under 8 minutes including model builds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import step as step_bench  # noqa: E402  (bench/step.py)

log = logging.getLogger("bench.gpu_suite")


def _profile(dry: bool) -> dict:
    """Model, sizes and step counts: the real ones, or tiny ones for the CPU dry run."""
    if dry:
        return dict(model="builtin:tiny-sd1", resolution=64, batch=2, warmup=0, steps=1, precision="bf16")
    return dict(model="builtin:sd15-arch", resolution=512, batch=8, warmup=3, steps=10, precision="bf16")


def _step_args(prof: dict, extra: list[str], *, device: str, peak: float | None, flops: bool) -> list[str]:
    argv = [
        "--model",
        prof["model"],
        "--resolution",
        str(prof["resolution"]),
        "--batch_size",
        str(prof["batch"]),
    ]
    argv += ["--precision", prof["precision"], "--warmup", str(prof["warmup"]), "--steps", str(prof["steps"])]
    argv += ["--device", device, "--optimizer", "adamw"]
    if peak:
        argv += ["--peak_tflops", str(peak)]
    if not flops:
        argv.append("--no_flops")
    return argv + extra


def recipe_step_args(train_json: Path, optimizer_json: Path | None) -> list[str]:
    """bench/step.py flags for a train.json recipe: its resolution, batch, memory options, optimizer."""
    cfg = json.loads(train_json.read_text())
    opt = json.loads(optimizer_json.read_text()) if optimizer_json and optimizer_json.is_file() else {}
    argv = ["--resolution", str(cfg.get("resolution", 512)), "--batch_size", str(cfg.get("batch_size", 2))]
    if str(cfg.get("resume_ckpt", "")).startswith("builtin:"):  # the recipe's own model
        argv += ["--model", cfg["resume_ckpt"]]
    argv += ["--optimizer", opt.get("base", {}).get("optimizer", "adamw8bit")]
    flags = {
        "gradient_checkpointing": "--gradient_checkpointing",
        "cache_latents": "--cache_latents",
        "fused_back_pass": "--fused_back_pass",
        "channels_last": "--channels_last",
        "disable_textenc_training": "--freeze_text_encoder",
    }
    argv += [flag for key, flag in flags.items() if cfg.get(key)]
    if cfg.get("weight_dtype") == "bf16":
        argv.append("--bf16_weights")
    if cfg.get("cache_text_encoder_outputs"):
        argv.append("--cache_text")
    return argv


def run_cuda_tests(out: Path, timeout: int) -> dict:
    """`pytest -m cuda` in a subprocess; counts from its JUnit XML."""
    xml = out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={xml}"]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    result = {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode,
        "seconds": round(time.monotonic() - started, 1),
    }
    if not xml.is_file():
        result["error"] = (proc.stdout + proc.stderr)[-2000:]
        return result
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, failures, errors, skipped = (
        int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")
    )
    result.update(
        tests=tests, failed=failures + errors, skipped=skipped, passed=tests - failures - errors - skipped
    )
    result["failures"] = []
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            result["failures"].append(f"{case.get('name')}: {bad.get('message', '')[:300]}")
    return result


def measure(name: str, argv: list[str]) -> dict:
    """One bench/step.py configuration in this process; a failure is recorded, not raised."""
    started = time.monotonic()
    try:
        result = step_bench.run_benchmark(step_bench.build_parser().parse_args(argv))
        result["status"] = "measured"
    except Exception as exc:  # recorded in the report with its traceback, and the exit code says so
        result = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
        log.error("%s failed: %s", name, result["error"])
    result["name"], result["argv"] = name, argv
    result["wall_s"] = round(time.monotonic() - started, 1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def speedup_variants(dry: bool) -> list[tuple[str, str, list[str], list[str]]]:
    """(group, name, baseline flags, variant flags) on top of the cached-latents UNet step."""
    base = ["--cache_latents", "--cache_text"]
    backend = "eager" if dry else "inductor"
    return [
        ("compile", "compile", base, [*base, "--compile", "--compile_backend", backend]),
        ("channels_last", "channels_last", base, [*base, "--channels_last"]),
        (
            "fused kernels",
            "AdamW fused vs foreach",
            [*base, "--optimizer_options", '{"foreach": true}'],
            base,
        ),
        *[
            ("SDPA", f"sdpa {k} vs math", [*base, "--sdpa_backend", "math"], [*base, "--sdpa_backend", k])
            for k in ("flash", "efficient", "cudnn")
        ],
        (
            "TF32",
            "fp32 step, TF32 on vs off",
            [*base, "--precision", "no", "--tf32", "off"],
            [*base, "--precision", "no", "--tf32", "on"],
        ),
        ("stalls", "adamw8bit (per-param sync) vs fused AdamW", base, [*base, "--optimizer", "adamw8bit"]),
        ("stalls", "EMA on host vs none", base, [*base, "--ema", "cpu"]),
        ("stalls", "EMA on device vs none", base, [*base, "--ema", "device"]),
        (
            "stalls",
            "bf16 SR chunked vs all at once",
            [*base, "--bf16_weights", "--sr_chunk_mb", "0"],
            [*base, "--bf16_weights"],
        ),
    ]


DRY_COMPILE = (
    "not run in the dry run (tracing takes ~1 min on CPU; tests/test_training_options.py compiles on CPU)"
)


def _ratio(base: dict, variant: dict) -> float | None:
    if base.get("status") != "measured" or variant.get("status") != "measured":
        return None
    return round(base["seconds_per_step_median"] / variant["seconds_per_step_median"], 3)


def run_suite(args: argparse.Namespace) -> dict:
    dry, out = args.dry_run, args.out
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device; run with --dry-run on CPU")
    prof = _profile(dry)
    peak = None if dry else args.peak_tflops
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "dry_run": dry,
        "machine": step_bench.machine_info(torch.device(device)),
        "profile": prof,
    }
    report["correctness"] = run_cuda_tests(out, timeout=args.test_timeout) if not args.skip_tests else None

    thr = {
        "unet_cached": ["--cache_latents", "--cache_text"],
        "full_finetune_pixels": [],
    }
    report["throughput"] = {
        n: measure(n, _step_args(prof, x, device=device, peak=peak, flops=True)) for n, x in thr.items()
    }

    report["memory"] = {}
    recipes = {
        "lowvram_sd15": (ROOT / "examples/train/lowvram_sd15.json", None),
        "default_recipe": (ROOT / "train.json", ROOT / "optimizer.json"),
    }
    for name, (train_json, opt_json) in recipes.items():
        argv = _step_args(prof, [], device=device, peak=None, flops=False) + recipe_step_args(
            train_json, opt_json
        )
        if dry:  # tiny model, tiny size: only the wiring is checked
            argv += ["--model", prof["model"], "--resolution", str(prof["resolution"]), "--batch_size", "1"]
        report["memory"][name] = measure(name, argv)

    report["speedups"] = []
    baselines: dict[str, dict] = {}
    for group, name, base_flags, variant_flags in speedup_variants(dry):
        if dry and group == "compile":  # dynamo traces even the tiny UNet for ~1 min on 2 cores
            report["speedups"].append({"group": group, "name": name, "ratio": None, "skipped": DRY_COMPILE})
            continue
        key = " ".join(base_flags)
        if key not in baselines:
            baselines[key] = measure(
                f"baseline {key}", _step_args(prof, base_flags, device=device, peak=None, flops=False)
            )
        variant = measure(name, _step_args(prof, variant_flags, device=device, peak=None, flops=False))
        report["speedups"].append(
            {
                "group": group,
                "name": name,
                "ratio": _ratio(baselines[key], variant),
                "baseline": baselines[key],
                "variant": variant,
            }
        )
    report["ok"] = _ok(report)
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_suite.md").write_text(markdown(report) + "\n")
    return report


def _ok(report: dict) -> bool:
    tests = report["correctness"]
    tests_ok = tests is None or (tests.get("failed", 1) == 0 and "error" not in tests)
    runs = [*report["throughput"].values(), *report["memory"].values()]
    runs += [r for s in report["speedups"] if "skipped" not in s for r in (s["baseline"], s["variant"])]
    # An SDPA kernel the device lacks is a result ("unsupported"), not a failure of the suite.
    return tests_ok and all(r["status"] == "measured" or _unsupported_sdpa(r) for r in runs)


def _unsupported_sdpa(result: dict) -> bool:
    error = result.get("error", "")
    return "--sdpa_backend" in result.get("argv", []) and (
        "No available kernel" in error or "No viable backend" in error
    )


def _mem(result: dict) -> str:
    mem = result.get("memory", {})
    if "cuda_peak_allocated_gib" in mem:
        return (
            f"{mem['cuda_peak_allocated_gib']} GiB allocated / {mem['cuda_peak_reserved_gib']} GiB reserved"
        )
    return f"{mem.get('peak_rss_mib', '?')} MiB RSS (CPU)"


def _cell(result: dict, text: str) -> str:
    if result.get("status") == "measured":
        return text
    return (
        "unsupported on this device"
        if _unsupported_sdpa(result)
        else f"FAILED: {result.get('error', '')[:120]}"
    )


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"gpu_suite {'DRY RUN (CPU, tiny model: numbers mean nothing)' if report['dry_run'] else ''} "
        f"{report['date']}, {m.get('gpu', m['device'])}, torch {m['torch']}",
        "",
        "| part | item | result |",
        "|---|---|---|",
    ]
    tests = report["correctness"]
    if tests is None:
        lines.append("| correctness | pytest -m cuda | not run (--skip-tests) |")
    elif "error" in tests:
        lines.append(f"| correctness | pytest -m cuda | FAILED to run: {tests['error'][-200:]!r} |")
    else:
        lines.append(
            f"| correctness | pytest -m cuda | {tests['passed']} passed, {tests['failed']} failed, "
            f"{tests['skipped']} skipped ({tests['seconds']} s) |"
        )
        lines += [f"| correctness | failure | {f} |" for f in tests["failures"]]
    for name, r in report["throughput"].items():
        mfu = f", MFU {r['mfu'] * 100:.1f} %" if r.get("mfu") is not None else ""
        text = f"{r.get('images_per_s', 0):.2f} images/s{mfu}, {_mem(r)}"
        lines.append(f"| throughput | {name} | {_cell(r, text)} |")
    for name, r in report["memory"].items():
        text = f"{_mem(r)}, {r.get('images_per_s', 0):.2f} images/s"
        lines.append(f"| memory | {name} | {_cell(r, text)} |")
    for s in report["speedups"]:
        if "skipped" in s:
            text = s["skipped"]
        elif s["ratio"] is not None:
            text = f"{s['ratio']:.2f}x ({s['baseline']['seconds_per_step_median']:.4f} -> {s['variant']['seconds_per_step_median']:.4f} s/step)"
        else:
            failed = s["variant"] if s["variant"]["status"] != "measured" else s["baseline"]
            text = _cell(failed, "")
        lines.append(f"| speed-up: {s['group']} | {s['name']} | {text} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, one step per variant (CI)")
    p.add_argument("--out", type=Path, default=Path("gpu_suite"), help="folder for gpu_suite.json / .md")
    p.add_argument(
        "--peak_tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)"
    )
    p.add_argument("--skip-tests", action="store_true", help="measure only (no pytest -m cuda)")
    p.add_argument("--test_timeout", type=int, default=240, help="seconds for the pytest part")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    report = run_suite(args)
    print(markdown(report))
    print(
        f"\n{time.monotonic() - started:.0f} s; wrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
