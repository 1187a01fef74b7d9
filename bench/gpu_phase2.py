"""Phase 2 of the GPU suite: throughput, speed-ups and the memory rows, compile last.

Each full-size build (`bench/step.py`'s `build`: the trainer's own `build_components`) is made
once and everything that can be switched on a built model is timed on it: the SDPA kernel (a
context per step), TF32 (process-wide flags), an EMA (built on the same UNet), the
stochastic-rounding chunk. FLOPs are counted on the timed build itself (no checkpointing or
compile there, so they are model FLOPs). What needs other weights, dtypes or optimizers is
another build. Parts run in order of what the lease is for: the two throughput figures, the
memory rows (docs/REAL_MODELS.md section 5, bench/gpu_recipes.py), the speed-ups, and compile
last, in a subprocess under its own deadline (a cold inductor compile of SD1.5 takes minutes).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import step as step_bench
import torch
from gpu_recipes import RECIPES, free_device_memory, release_fused_hooks, run_recipe
from gpu_report import Measurement, Report

ROOT = Path(__file__).resolve().parents[1]
CACHED = ["--cache_latents", "--cache_text"]

# Per-unit costs of the H100 estimate (seconds): loading a full-size model from the on-disk
# cache and placing it (~4.3 GB of safetensors from the page cache, then to the GPU); building
# it into that cache when phase 1 did not (random init + save, CPU); a bf16 step of the cached
# UNet at batch 8 (FLOPs counted by bench/step.py: 2.03 TFLOP per 512 px image, at 30 % of the
# H100's 989 TFLOP/s, i.e. the 150 images/s goal); a memory row (load, latent cache, 2 steps, a
# 2-step sample, a validation image, a save of ~5-14 GB at ~1 GB/s); a cold inductor compile.
EST_LOAD, EST_CACHE_BUILD, EST_ROW, EST_COMPILE = 6.0, 40.0, 25.0, 90.0
EST_STEP = 2.03e12 * 8 / (989e12 * 0.30)
STEP_COST = {"bf16": 1.0, "pixels": 1.45, "tf32": 2.5, "fp32": 12.0}  # x EST_STEP


@dataclass
class Timing:
    """One timed setting on a build: `switch` puts it in place around the timed steps."""

    name: str
    switch: Callable[[step_bench.Bench], contextlib.AbstractContextManager] | None = None
    baseline: str | None = None  # the timing of the same build it is a speed-up over
    cost: str = "bf16"


@dataclass
class Build:
    """One build of bench/step.py flags and the timings made on it."""

    section: str  # throughput or speed-up
    name: str
    flags: list[str]
    timings: list[Timing]
    flops: bool = False


def _sdpa(kernel: str):
    @contextlib.contextmanager
    def switch(bench):
        saved, bench.args.sdpa_backend = bench.args.sdpa_backend, kernel
        try:
            yield
        finally:
            bench.args.sdpa_backend = saved

    return switch


def _tf32(on: bool):
    @contextlib.contextmanager
    def switch(bench):
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    return switch


def _ema(device: str):
    @contextlib.contextmanager
    def switch(bench):
        from trainer.parts.ema import EMA

        target = "cpu" if device == "cpu" else bench.step.device
        bench.ema = EMA({"unet": bench.model.unet}, decay=0.999, update_interval=1, device=target)
        try:
            yield
        finally:
            bench.ema = None

    return switch


def _rounding_chunk(chunk_bytes: int | None):
    @contextlib.contextmanager
    def switch(bench):
        rounding = bench.optim.rounding
        saved, rounding.chunk_bytes = rounding.chunk_bytes, chunk_bytes
        try:
            yield
        finally:
            rounding.chunk_bytes = saved

    return switch


def builds() -> tuple[list[Build], list[Build]]:
    """(throughput builds, speed-up builds), in the order they run."""
    sdpa = [Timing(f"sdpa {k}", _sdpa(k), baseline="sdpa math") for k in ("flash", "efficient", "cudnn")]
    throughput = [
        Build(
            "throughput",
            "unet_cached",
            CACHED,
            [
                Timing("unet_cached"),
                Timing("sdpa math", _sdpa("math")),
                *sdpa,
                Timing("EMA on the device, every step", _ema("device"), baseline="unet_cached"),
                Timing("EMA on the host, every step", _ema("cpu"), baseline="unet_cached"),
            ],
            flops=True,
        ),
        Build(
            "throughput", "full_finetune_pixels", [], [Timing("full_finetune_pixels", cost="pixels")], True
        ),
    ]
    speedups = [
        Build("speed-up", "channels_last", [*CACHED, "--channels_last"], [Timing("channels_last")]),
        Build(
            "speed-up",
            "AdamW foreach",
            [*CACHED, "--optimizer_options", '{"foreach": true}'],
            [Timing("foreach")],
        ),
        Build("speed-up", "adamw8bit", [*CACHED, "--optimizer", "adamw8bit"], [Timing("adamw8bit")]),
        Build(
            "speed-up",
            "fp32 step",
            [*CACHED, "--precision", "no"],
            [
                Timing("TF32 off", _tf32(False), cost="fp32"),
                Timing("TF32 on", _tf32(True), "TF32 off", "tf32"),
            ],
        ),
        Build(
            "speed-up",
            "bf16 weights",
            [*CACHED, "--bf16_weights"],
            [Timing("SR all at once", _rounding_chunk(None)), Timing("SR chunked", None, "SR all at once")],
        ),
    ]
    return throughput, speedups


# Speed-ups measured on another build: (timing, baseline timing name).
CROSS_BASELINES = {"channels_last": "unet_cached", "foreach": "unet_cached", "adamw8bit": "unet_cached"}


def profile(dry: bool) -> dict:
    if dry:
        return dict(model="builtin:tiny-sd1", resolution=64, batch=2, warmup=0, steps=1)
    return dict(model="builtin:sd15-arch", resolution=512, batch=8, warmup=3, steps=10)


def plan(dry: bool) -> dict:
    """What phase 2 runs and its estimated H100 time, from counted builds and steps."""
    prof = profile(False)
    per_timing = prof["warmup"] + prof["steps"]
    throughput, speedups = builds()
    all_builds = throughput + speedups
    step_s = sum(STEP_COST[t.cost] * per_timing * EST_STEP for b in all_builds for t in b.timings)
    flop_s = sum(STEP_COST["pixels"] * EST_STEP * 2 for b in all_builds if b.flops)
    estimate = len(all_builds) * EST_LOAD + step_s + flop_s + len(RECIPES) * EST_ROW + EST_COMPILE
    return {
        "parts": [f"{b.section}: {b.name}" for b in all_builds]
        + [f"memory: {r.row}" for r in RECIPES]
        + ["compile"],
        "rows": list(iter_parts()),
        "builds": len(all_builds) + len(RECIPES) + 1,
        "timed_steps": sum(len(b.timings) for b in all_builds) * per_timing,
        "estimate_s": round(estimate),
        "estimate_method": (
            f"{len(all_builds)} step builds x {EST_LOAD} s load + {sum(len(b.timings) for b in all_builds)} "
            f"timings x {per_timing} steps at {EST_STEP * 1e3:.0f} ms per bf16 batch-8 step (2.03 TFLOP/image "
            f"counted by bench/step.py at 30 % MFU; x{STEP_COST['pixels']} pixels, x{STEP_COST['tf32']} TF32, "
            f"x{STEP_COST['fp32']} fp32) + {len(RECIPES)} memory rows x {EST_ROW} s + compile {EST_COMPILE} s; "
            f"+{EST_CACHE_BUILD} s per full-size model when phase 1 did not cache it"
        ),
    }


def run(report: Report, *, dry: bool, peak_tflops: float | None, compile_deadline: float, work: Path) -> None:
    """Every part in order; one that would not finish before the phase's deadline (by its H100
    estimate) is recorded as not run, so the phase returns what it has in time."""
    device = torch.device("cpu" if dry else "cuda")
    prof = profile(dry)
    throughput, speedups = builds()
    seconds: dict[str, float] = {}  # timing name -> median s/step, for the ratios
    steps = prof["warmup"] + prof["steps"]
    for build in throughput:
        if dry or _fits(report, build.section, build.name, _build_estimate(build, steps)):
            run_build(report, build, prof, device, peak_tflops, seconds)
    for recipe in RECIPES:
        if dry or _fits(report, "memory", recipe.row, EST_ROW):
            run_memory_row(report, recipe, dry=dry, device=device, work=work)
    for build in speedups:
        if dry or _fits(report, build.section, build.name, _build_estimate(build, steps)):
            run_build(report, build, prof, device, None, seconds)
    compile_deadline = min(compile_deadline, report.remaining() - 5)
    run_compile(report, prof, device=device, dry=dry, deadline=compile_deadline)


def _build_estimate(build: Build, steps: int) -> float:
    flops = STEP_COST["pixels"] * EST_STEP * 2 if build.flops else 0.0
    return EST_LOAD + flops + sum(STEP_COST[t.cost] * steps * EST_STEP for t in build.timings)


def _fits(report: Report, section: str, name: str, estimate: float) -> bool:
    if report.remaining() >= estimate:
        return True
    text = f"{report.remaining():.0f} s left before the phase's deadline, ~{estimate:.0f} s needed"
    report.add(Measurement(section, name, "not run", 0.0, text))
    return False


def _argv(prof: dict, flags: list[str], device: torch.device, peak: float | None) -> list[str]:
    argv = [
        "--model",
        prof["model"],
        "--resolution",
        str(prof["resolution"]),
        "--batch_size",
        str(prof["batch"]),
    ]
    argv += ["--precision", "bf16", "--optimizer", "adamw", "--device", device.type, "--no_flops"]
    if peak:
        argv += ["--peak_tflops", str(peak)]
    return argv + flags  # later flags win (argparse): a build's own --precision / --optimizer


def run_build(report: Report, build: Build, prof: dict, device, peak, seconds: dict[str, float]) -> None:
    """Build once; time each setting on it; a failure is recorded and ends only this build."""
    argv = _argv(prof, build.flags, device, peak)
    started = time.monotonic()
    try:
        bench = step_bench.build(step_bench.build_parser().parse_args(argv))
        flops = step_bench.count_step_flops(bench) if build.flops else None
    except Exception as exc:  # recorded with its traceback; the exit code says so
        report.add(_failed(build.section, f"build {build.name}", exc, started, {"argv": argv}))
        return
    built = {"build": build.name, "argv": argv, "build_s": round(time.monotonic() - started, 1)}
    try:
        for timing in build.timings:
            _time_one(report, built | {"section": build.section}, timing, bench, prof, flops, seconds)
    finally:
        release_fused_hooks(bench.optim)
        del bench
        free_device_memory(device)


def _time_one(report: Report, built: dict, timing: Timing, bench, prof: dict, flops, seconds: dict) -> None:
    started, section = time.monotonic(), built["section"]
    try:
        with timing.switch(bench) if timing.switch else contextlib.nullcontext():
            result = step_bench.time_steps(bench, warmup=prof["warmup"], steps=prof["steps"], flops=flops)
    except Exception as exc:
        status = "unsupported" if _unsupported_kernel(exc) else "failed"
        report.add(_failed(section, timing.name, exc, started, built, status))
        return
    median = result["seconds_per_step_median"]
    seconds[timing.name] = median
    baseline = timing.baseline or CROSS_BASELINES.get(timing.name)
    ratio = round(seconds[baseline] / median, 3) if baseline in seconds else None
    text = f"{result['images_per_s']:.2f} images/s ({median:.4f} s/step)"
    if result.get("mfu") is not None:
        text += f", MFU {result['mfu'] * 100:.1f} %"
    if ratio is not None:
        text += f", {ratio:.2f}x over {baseline}"
    text += f", {_memory_text(result['memory'])}"
    data = built | {"ratio": ratio, "baseline": baseline, "result": result}
    report.add(Measurement(section, timing.name, "measured", time.monotonic() - started, text, data))


def run_memory_row(report: Report, recipe, *, dry: bool, device, work: Path) -> None:
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            result = run_recipe(recipe, Path(tmp), dry=dry, device=device)
    except Exception as exc:
        report.add(_failed("memory", recipe.row, exc, started, {"train_json": recipe.train_json}))
        free_device_memory(device)
        return
    done = f"{result['steps']} steps, {result['samples']} sample(s), validation {result['validated']}, "
    done += f"{result['checkpoints']} save(s)"
    plan = plan_beside(recipe, result["memory"], work=work, dry=dry, device=device)
    text = f"peak {_memory_text(result['memory'])} ({recipe.train_json}; {done}); {plan['text']}"
    data = {"train_json": recipe.train_json, **result, "plan": plan}
    report.add(Measurement("memory", recipe.row, "measured", time.monotonic() - started, text, data))


def plan_beside(recipe, memory: dict, *, work: Path, dry: bool, device) -> dict:
    """The memory plan's prediction for the row's recipe (the same settings run_recipe trains
    with), beside the measured peak, and their ratio: the plan's tensors (its total without the
    CUDA context and allocator margin estimates) against the allocator's peak allocated, and its
    total against the peak reserved (on CPU: the plan for the CPU against the peak RSS)."""
    from gpu_recipes import _cli, recipe_settings

    from trainer.config import load_config
    from trainer.optim import load_optimizer_file
    from trainer.plan import plan_memory

    try:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            settings = recipe_settings(recipe, Path(tmp), dry=dry)
            argv = [arg for key, value in settings.items() for arg in (f"--{key}", _cli(value))]
            cfg = load_config(str(ROOT / recipe.train_json), argv)
            plan = plan_memory(
                cfg, load_optimizer_file(cfg.optimizer_config), device=device.type, with_advice=False
            )
    except Exception as exc:  # the measurement stands without it
        return {"text": f"no plan ({type(exc).__name__}: {exc})", "error": str(exc)}
    gib = 2**30
    total = plan.total_bytes
    tensors = total - plan.categories["cuda_context"] - plan.categories["allocator_margin"]
    out = {"plan_total_gib": round(total / gib, 3), "plan_tensors_gib": round(tensors / gib, 3)}
    out["plan_categories"] = dict(plan.categories)
    if plan.host is not None:
        out["plan_host_gib"] = round(plan.host.total_bytes / gib, 3)
    if "cuda_peak_allocated_gib" in memory:
        allocated, reserved = memory["cuda_peak_allocated_gib"], memory["cuda_peak_reserved_gib"]
        out["ratio_allocated"] = round(tensors / gib / allocated, 3) if allocated else None
        out["ratio_reserved"] = round(total / gib / reserved, 3) if reserved else None
        out["text"] = (
            f"plan {out['plan_tensors_gib']} GiB tensors (x{out['ratio_allocated']} of allocated), "
            f"{out['plan_total_gib']} GiB with context and margin (x{out['ratio_reserved']} of reserved)"
        )
    else:
        rss = memory.get("peak_rss_mib")
        out["ratio_rss"] = round(total / 2**20 / rss, 3) if rss else None
        out["text"] = f"plan {out['plan_total_gib']} GiB on the CPU (x{out['ratio_rss']} of the peak RSS)"
    return out


def run_compile(report: Report, prof: dict, *, device, dry: bool, deadline: float) -> None:
    """bench/step.py --compile in a subprocess, killed at `deadline` seconds (its own limit).
    The dry run leaves `--compile` out: dynamo traces even the tiny UNet for about a minute on
    two CPU cores (tests/test_training_options.py compiles on CPU); the subprocess, its
    deadline and its JSON are what the dry run checks."""
    if deadline < 5:
        report.add(Measurement("compile", "compile (inductor)", "not run", 0, "no time left in the phase"))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "compile.json"
        compile_flags = [] if dry else ["--compile", "--compile_backend", "inductor"]
        flags = [
            *CACHED,
            *compile_flags,
            "--warmup",
            str(min(prof["warmup"], 2)),
            "--steps",
            str(prof["steps"]),
        ]
        argv = _argv(prof, flags, device, None)
        cmd = [sys.executable, str(ROOT / "bench" / "step.py"), *argv, "--json", str(out)]
        started = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=deadline)
        except subprocess.TimeoutExpired:
            text = f"not finished within its deadline of {deadline:.0f} s (cold inductor compile)"
            report.add(
                Measurement("compile", "compile (inductor)", "deadline", time.monotonic() - started, text)
            )
            return
        seconds = time.monotonic() - started
        if done.returncode != 0:
            text = f"bench/step.py exited {done.returncode}: {done.stderr[-300:]}"
            report.add(
                Measurement("compile", "compile (inductor)", "failed", seconds, text, {"stderr": done.stderr})
            )
            return
        result = json.loads(out.read_text())
    median = result["seconds_per_step_median"]
    text = (
        f"{result['images_per_s']:.2f} images/s ({median:.4f} s/step) after compiling; {seconds:.0f} s in all"
    )
    report.add(Measurement("compile", "compile (inductor)", "measured", seconds, text, {"result": result}))


def _failed(section, name, exc, started, data, status="failed") -> Measurement:
    text = f"{type(exc).__name__}: {exc}"[:300]
    data = data | {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    return Measurement(section, name, status, time.monotonic() - started, text, data)


def _unsupported_kernel(exc: Exception) -> bool:
    """An SDPA kernel this device or dtype lacks is a result, not a failure."""
    return "No available kernel" in str(exc) or "No viable backend" in str(exc)


def _memory_text(mem: dict) -> str:
    if "cuda_peak_allocated_gib" in mem:
        return (
            f"{mem['cuda_peak_allocated_gib']} GiB allocated / {mem['cuda_peak_reserved_gib']} GiB reserved"
        )
    return f"{mem.get('peak_rss_mib', '?')} MiB RSS (CPU)"


def iter_parts() -> Iterator[str]:
    """The names of the rows phase 2 writes, in the order `run` writes them."""
    throughput, speedups = builds()
    for build in throughput:
        yield from (t.name for t in build.timings)
    yield from (r.row for r in RECIPES)
    for build in speedups:
        yield from (t.name for t in build.timings)
    yield "compile (inductor)"
