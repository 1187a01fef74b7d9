"""Benchmark the real training step: seconds/step, images/s, peak memory, FLOPs/image, MFU.

    python bench/step.py --model builtin:tiny-sd1 --resolution 128 --batch_size 4
    python bench/step.py --model builtin:sd15-arch --resolution 512 --batch_size 8 \
        --precision bf16 --optimizer adamw --cache_latents --cache_text --peak_tflops 989
    python bench/step.py ... --json out.json

The step is built as the trainer builds it, by `trainer.parts.builder.build_components` from the
train.json these options stand for (`bench_config`; optimizer.json holding only `--optimizer`,
`--lr` and `--optimizer_options`): model, optimizers, `TrainingStep`, models placed and wrapped
as in training; loss = per-sample loss summed / batch size, `optim.backward`, `optim.step()`. Batches are
synthetic (random pixels in [-1, 1], captions from a pool): this measures the step, not the
data pipeline (see bench/data_throughput.py for that).

* `--cache_latents`: batches carry VAE latents (posterior mean, as the latent cache stores)
  instead of pixels, so the VAE encode leaves the step.
* `--cache_text`: text encoder frozen and its outputs served by `TextEmbeddingCache`, filled
  before timing (steady state from the second epoch on). `--freeze_text_encoder` alone freezes
  it without the cache (the baseline for the cache).
* `--fused_backward`: per-parameter optimizer step inside the backward (trainer/optim/fused_backward.py).
* `--bf16_weights`: UNet (and trained TE) weights stored in bf16, updated with stochastic rounding.
* `--vae_layout contiguous`: the VAE in NCHW instead of the channels_last layout training gives
  it (trainer/parts/placement.py), to measure that choice.
* `--generic_blocks`: diffusers' own attention and ResNet forwards instead of the exact lean
  ones training installs (trainer/parts/lean_blocks.py), to measure what those save.
* `--breakdown`: after the timed steps, time `--steps` more split into phases (text encode,
  VAE encode, UNet forward, UNet backward, text-encoder backward, optimizer, the loop's
  per-step bookkeeping, the rest of the step) with hooks on the models, the step itself
  unchanged (on CUDA each phase boundary synchronises, which the plain timing does not).
  Data loading is not in this benchmark (synthetic batches): bench/loop.py times the loop.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode over one forward+backward (no
optimizer step) in eager mode *before* gradient checkpointing and compile are applied, so they
are model FLOPs (recomputation is not counted: the MFU is MFU, not hardware FLOPs utilisation).
The counter counts matmuls, convolutions and attention, not element-wise ops.
MFU = FLOPs/image x images/s / (peak_tflops x 1e12).

Host page faults and system CPU seconds per step are printed too: trainer/runtime/host_memory.py keeps
freed memory in the process, as train.py does (`SDTRAINER_HOST_MEMORY=default` for the C
library's own behaviour, to compare).

Peak memory: on CUDA, torch.cuda max allocated / reserved over the timed steps. On CPU, the
process's peak RSS (VmHWM) over the timed steps, after resetting it through
/proc/self/clear_refs; where that reset is not possible the scope says "process".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from accelerate import Accelerator

from trainer.config import TrainConfig
from trainer.data.batch import Batch
from trainer.models import SDComponents
from trainer.optim import TrainingOptimizer, parse_optimizer_json
from trainer.parts.builder import build_components
from trainer.parts.ema import EMA
from trainer.parts.lean_blocks import use_generic_blocks
from trainer.runtime.host_memory import configure_host_memory
from trainer.step.training_step import TrainingStep

log = logging.getLogger("bench.step")

CAPTIONS = [
    "a photo of a red circle on a white background",
    "a yellow square, flat colours, centred",
    "black triangle, high contrast, simple shape",
    "purple cross on grey, studio lighting",
    "a small green star in the corner of the image",
    "an orange hexagon with a thin blue outline",
    "two white circles side by side, minimalist",
    "a pink heart shape, soft shadow, pastel",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny-sd1", help="any model spec load_model accepts")
    p.add_argument("--resolution", type=int, default=128, help="square image side in pixels")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no", help="autocast dtype")
    p.add_argument("--optimizer", default="adamw8bit", help="optimizer name from trainer.optim's registry")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--cache_latents", action="store_true", help="feed latents (no VAE encode in the step)")
    p.add_argument("--freeze_text_encoder", action="store_true", help="train the UNet only")
    p.add_argument(
        "--cache_text",
        "--cache_text_encoder_outputs",
        dest="cache_text",
        action="store_true",
        help="frozen TE + TextEmbeddingCache",
    )
    p.add_argument("--channels_last", action="store_true", help="UNet and latents in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (module.compile())")
    p.add_argument(
        "--vae_layout",
        choices=("channels_last", "contiguous"),
        default="channels_last",
        help="the VAE's memory format (training stores it channels_last; contiguous for comparison)",
    )
    p.add_argument(
        "--generic_blocks",
        action="store_true",
        help="diffusers' own attention/ResNet forwards (training uses trainer/parts/lean_blocks.py's)",
    )
    p.add_argument(
        "--fused_backward",
        "--fused_back_pass",
        dest="fused_backward",
        action="store_true",
        help="optimizer step inside backward (train.json fused_back_pass)",
    )
    p.add_argument(
        "--bf16_weights",
        action="store_true",
        help="bf16 weights + stochastic rounding (train.json weight_dtype bf16)",
    )
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend with --compile")
    p.add_argument(
        "--optimizer_options",
        default="{}",
        help='extra optimizer.json base keys as JSON, e.g. {"fused": false}',
    )
    p.add_argument(
        "--sdpa_backend",
        choices=("default", "flash", "efficient", "cudnn", "math"),
        default="default",
        help="restrict PyTorch SDPA to one kernel (torch.nn.attention.sdpa_kernel)",
    )
    p.add_argument(
        "--tf32", choices=("on", "off"), default="on", help="CUDA TF32 matmul/conv (train.json allow_tf32)"
    )
    p.add_argument(
        "--sr_chunk_mb",
        type=float,
        default=64,
        help="stochastic-rounding chunk (MiB of fp32 weights); 0 = all at once",
    )
    p.add_argument(
        "--ema", choices=("none", "cpu", "device"), default="none", help="EMA updated every step, here"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, allocator)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--peak_tflops", type=float, default=None, help="device peak for MFU, e.g. 989 (H100 bf16)"
    )
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", action="store_true", help="also time the phases of the step")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p


@dataclass
class Bench:
    """One built configuration: model, step, optimizer set and synthetic batches."""

    args: argparse.Namespace
    model: SDComponents
    step: TrainingStep
    optim: TrainingOptimizer
    scaler: torch.amp.GradScaler | None
    batches: list[Batch]
    ema: EMA | None = None
    steps_taken: int = 0  # optimizer steps run on this build (time_steps continues from here)

    def run_step(self, index: int) -> None:
        """One optimizer step as the training loop takes it (grad_accum 1)."""
        batch = self.batches[index % len(self.batches)]
        with _sdpa(self.args.sdpa_backend):
            out = self.step(batch)
            loss = out.loss.sum() / len(batch.captions)
            self.optim.backward(loss, self.scaler)
        self.optim.step(self.scaler)
        if self.ema is not None:
            self.ema.update()


def _sdpa(name: str):
    """The SDPA kernel restriction of --sdpa_backend (a no-op for "default")."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
    return sdpa_kernel(getattr(SDPBackend, names.get(name, "MATH")))


def bench_config(args: argparse.Namespace, *, eager: bool = False) -> TrainConfig:
    """The train.json these options stand for. `eager` leaves out what the FLOP count must not
    see: gradient checkpointing (recomputation), compile, and the fused back pass (its hooks
    would step the optimizer during the count)."""
    return TrainConfig(
        resume_ckpt=args.model,
        batch_size=args.batch_size,
        mixed_precision=args.precision,
        lr=args.lr,
        seed=args.seed,
        disable_textenc_training=args.freeze_text_encoder or args.cache_text,
        cache_text_encoder_outputs=args.cache_text,
        channels_last=args.channels_last,
        allow_tf32=args.tf32 == "on",
        gradient_checkpointing=args.gradient_checkpointing and not eager,
        compile=args.compile and not eager,
        compile_backend=args.compile_backend,
        fused_back_pass=args.fused_backward and not eager,
        weight_dtype="bf16" if args.bf16_weights else "fp32",
        ema_decay_rate=0.999 if args.ema != "none" and not eager else None,
        ema_update_interval=1,
        ema_device="cpu" if args.ema == "cpu" else "device",
    )


def build(args: argparse.Namespace, *, eager: bool = False) -> Bench:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = {"optimizer": args.optimizer, "lr": args.lr, **json.loads(args.optimizer_options)}
    opt_file = parse_optimizer_json(json.dumps({"base": base}), f"bench --optimizer {args.optimizer}")
    parts = build_components(
        bench_config(args, eager=eager),
        Accelerator(mixed_precision="no", cpu=device.type == "cpu"),
        opt_file=opt_file,
        total_optimizer_steps=args.warmup + args.steps + 1,
    )
    if args.generic_blocks:
        use_generic_blocks(parts.model.unet, parts.model.vae)
    if args.vae_layout == "contiguous":
        parts.model.vae.to(memory_format=torch.contiguous_format)
    if parts.optim.rounding is not None:
        parts.optim.rounding.chunk_bytes = int(args.sr_chunk_mb * 2**20) or None
    batches = _batches(args, parts.step, device)
    if parts.step.text_cache is not None:  # steady state: every caption seen in an earlier epoch
        with torch.no_grad():
            for b in batches:
                parts.step(b)
    return Bench(
        args=args,
        model=parts.model,
        step=parts.step,
        optim=parts.optim,
        scaler=parts.scaler,
        batches=batches,
        ema=parts.ema,
    )


def _batches(args: argparse.Namespace, step: TrainingStep, device: torch.device) -> list[Batch]:
    """A few distinct batches, already on the device (pinned-memory transfer is the loader's job)."""
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for i in range(4):
        pixels = torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=gen) * 2 - 1
        captions = [CAPTIONS[(i * args.batch_size + k) % len(CAPTIONS)] for k in range(args.batch_size)]
        seeds = [args.seed * 1000 + i * args.batch_size + k for k in range(args.batch_size)]
        if args.cache_latents:
            out.append(Batch(captions, seeds, latents=step.encode_latents(pixels.to(device))))
        else:
            out.append(Batch(captions, seeds, pixel_values=pixels.to(device)))
    return out


def count_flops(args: argparse.Namespace) -> int:
    """Model FLOPs of one forward+backward, on an eager build of the same configuration (no
    checkpointing, compile or fused hooks), freed before the timed build."""
    return count_step_flops(build(args, eager=True))


def count_step_flops(bench: Bench) -> int:
    """FLOPs of one forward+backward of `bench` (matmuls, convolutions, attention). On a build
    without checkpointing or compile these are the model FLOPs, so the GPU suite counts on the
    build it times instead of building the model twice; the fused back pass's hooks still step
    the optimizer during the count (element-wise work, not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, _sdpa(bench.args.sdpa_backend):
        out = bench.step(bench.batches[0])
        bench.optim.backward(out.loss.sum() / len(bench.batches[0].captions), bench.scaler)
    bench.optim.step(bench.scaler)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> str:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return "timed steps"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError as exc:
        log.warning("cannot reset peak RSS (%s); reporting the process lifetime peak", exc)
        return "process"
    return "timed steps"


def _proc_status_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _memory(device: torch.device, scope: str) -> dict:
    if device.type == "cuda":
        return {
            "cuda_peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "cuda_peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3),
        }
    hwm = _proc_status_kb("VmHWM")
    if hwm is None:
        hwm, scope = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "process"
    return {"peak_rss_mib": round(hwm / 1024, 1), "peak_rss_scope": scope}


def run_benchmark(args: argparse.Namespace) -> dict:
    """Build, count FLOPs, warm up, time `args.steps` optimizer steps; return the result dict."""
    flops = None if args.no_flops else count_flops(args)
    bench = build(args)
    result = time_steps(bench, warmup=args.warmup, steps=args.steps, flops=flops)
    if args.breakdown:
        result["breakdown"] = time_phases(bench, args.steps, args.warmup + args.steps)
    return result


def time_steps(bench: Bench, *, warmup: int, steps: int, flops: int | None) -> dict:
    """Warm up, then time `steps` optimizer steps of an existing build (the GPU suite times
    several settings on one build: SDPA kernel, TF32, EMA, rounding chunk); the result dict."""
    args, device = bench.args, bench.step.device
    first = bench.steps_taken  # batches continue across calls on the same build
    for i in range(warmup):
        bench.run_step(first + i)
    _sync(device)
    scope = _reset_peak(device)
    times, cpu_times = [], []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        bench.run_step(first + warmup + i)
        _sync(device)  # only the benchmark syncs: the time must include the queued GPU work
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    after = resource.getrusage(resource.RUSAGE_SELF)
    bench.steps_taken = first + warmup + steps
    median = statistics.median(times)
    images_per_s = args.batch_size / median
    flops_per_image = flops / args.batch_size if flops is not None else None
    mfu = None
    if flops_per_image is not None and args.peak_tflops:
        mfu = flops_per_image * images_per_s / (args.peak_tflops * 1e12)
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds_per_step_median": round(median, 5),
        "seconds_per_step_min": round(min(times), 5),
        "seconds_per_step_max": round(max(times), 5),
        "seconds_per_step_all": [round(t, 5) for t in times],
        # CPU seconds of this process (all its threads) per step: steadier than wall time on a
        # shared machine, and what bench/loop.py compares with the loop's
        "cpu_seconds_per_step_median": round(statistics.median(cpu_times), 5),
        # host page faults and kernel time per step (trainer/runtime/host_memory.py: freed memory kept)
        "page_faults_per_step": (after.ru_minflt - usage.ru_minflt) // steps,
        "system_seconds_per_step": round((after.ru_stime - usage.ru_stime) / steps, 5),
        "images_per_s": images_per_s,
        "model_flops_per_image": flops_per_image,
        "model_tflops_per_image": round(flops_per_image / 1e12, 6) if flops_per_image is not None else None,
        "achieved_tflops": flops_per_image * images_per_s / 1e12 if flops_per_image else None,
        "mfu": mfu,
        "peak_tflops": args.peak_tflops,
        "memory": _memory(device, scope),
        "trained": {name: c.trainable_count for name, c in bench.optim.components.items()},
        "attention": sorted({type(p).__name__ for p in bench.model.unet.attn_processors.values()}),
        "machine": machine_info(device),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "breakdown": None,
    }


PHASES = (
    "text encode",
    "VAE encode",
    "UNet forward",
    "rest of forward",
    "UNet backward",
    "TE backward",
    "optimizer",
    "EMA",
    "bookkeeping",
)


class PhaseClock:
    """Wall time per phase of real steps, read from hooks on the models (the step is unchanged).

    Forward phases come from pre/post forward hooks on the text encoder and UNet and a wrapper
    around `vae.encode`; the backward is split where the gradient reaches the text encoder's
    output (a tensor hook): before it the UNet's backward, after it the encoder's. "rest of
    forward" is the step call minus the timed forward parts (tokenising, noise, timesteps,
    loss maths). On CUDA every boundary synchronises so a phase holds its own kernels.
    """

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.device = bench.step.device
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._open: dict[str, float] = {}
        self._split: float | None = None
        self._handles: list = []

    def now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def start(self, phase: str) -> None:
        self._open[phase] = self.now()

    def stop(self, phase: str) -> float:
        elapsed = self.now() - self._open.pop(phase)
        self.totals[phase] += elapsed
        return elapsed

    def __enter__(self) -> PhaseClock:
        model = self.bench.model
        for name, module in (("text encode", model.text_encoder), ("UNet forward", model.unet)):
            self._handles.append(module.register_forward_pre_hook(lambda *_, n=name: self.start(n)))
            self._handles.append(module.register_forward_hook(self._forward_done(name)))
        encode = model.vae.encode

        def timed_encode(*a, **k):
            self.start("VAE encode")
            try:
                return encode(*a, **k)
            finally:
                self.stop("VAE encode")

        model.vae.encode = timed_encode  # instance attribute: removed again on exit
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        del self.bench.model.vae.encode

    def _forward_done(self, name: str):
        def hook(module, args, output):
            self.stop(name)
            if name == "text encode":
                hidden = getattr(output, "last_hidden_state", None)
                if hidden is not None and hidden.requires_grad:
                    hidden.register_hook(self._text_grad)

        return hook

    def _text_grad(self, grad):
        if self._split is None:
            self._split = self.now()
        return grad

    def run_step(self, index: int) -> None:
        """`Bench.run_step` with each phase timed, plus the loop's per-step StepTracker calls."""
        from trainer.run.progress import StepTracker

        bench = self.bench
        if not hasattr(self, "tracker"):
            sink = type("NullMetrics", (), {"scalars": lambda *a, **k: None})()
            self.tracker = StepTracker(
                sink, log_step=25, total_steps=10**6, start_step=0, batch_size=1, enabled=False
            )
        batch = bench.batches[index % len(bench.batches)]
        with _sdpa(bench.args.sdpa_backend):
            forward_start = self.now()
            before = sum(self.totals[p] for p in ("text encode", "VAE encode", "UNet forward"))
            out = bench.step(batch)
            loss = out.loss.sum() / len(batch.captions)
            inner = sum(self.totals[p] for p in ("text encode", "VAE encode", "UNet forward")) - before
            self.totals["rest of forward"] += self.now() - forward_start - inner
            self._split = None
            backward_start = self.now()
            bench.optim.backward(loss, bench.scaler)
            backward_end = self.now()
        split = backward_end if self._split is None else self._split
        self.totals["UNet backward"] += split - backward_start
        self.totals["TE backward"] += backward_end - split
        self.start("optimizer")
        result = bench.optim.step(bench.scaler)
        self.stop("optimizer")
        if bench.ema is not None:
            self.start("EMA")
            bench.ema.update()
            self.stop("EMA")
        self.start("bookkeeping")
        self.tracker.micro_batch(out.loss, out.timesteps)
        self.tracker.optimizer_step(index + 1, result.grad_norms, dict, 0)
        self.stop("bookkeeping")


def time_phases(bench: Bench, steps: int, first_index: int) -> dict:
    """Mean seconds per step of each phase over `steps` more steps (see PhaseClock)."""
    with PhaseClock(bench) as clock:
        started = time.perf_counter()
        for i in range(steps):
            clock.run_step(first_index + i)
        total = time.perf_counter() - started
    phases = {name: round(t / steps, 5) for name, t in clock.totals.items() if t > 0}
    return {"steps": steps, "seconds_per_step": round(total / steps, 5), "phases": phases}


def format_breakdown(b: dict) -> str:
    total = b["seconds_per_step"]
    lines = [f"breakdown    (mean of {b['steps']} steps, {total:.4f} s/step with the phase hooks)"]
    for name, seconds in b["phases"].items():
        lines.append(f"  {name:<16} {seconds:8.4f} s  {seconds / total * 100:5.1f} %")
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        # the libraries whose kernels and loaders a figure depends on (bench/pin_wheels.py)
        **{name: _version(name) for name in ("diffusers", "transformers", "accelerate", "bitsandbytes")},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_result(r: dict) -> str:
    mem = r["memory"]
    mem_text = (
        f"peak RSS {mem['peak_rss_mib']} MiB ({mem['peak_rss_scope']})"
        if "peak_rss_mib" in mem
        else f"CUDA peak {mem['cuda_peak_allocated_gib']} GiB allocated / {mem['cuda_peak_reserved_gib']} GiB reserved"
    )
    flops = r["model_tflops_per_image"]
    lines = [
        f"seconds/step {r['seconds_per_step_median']:.4f} (median of {len(r['seconds_per_step_all'])}, "
        f"min {r['seconds_per_step_min']:.4f}, max {r['seconds_per_step_max']:.4f})",
        f"images/s     {r['images_per_s']:.2f}",
        f"host         {r['page_faults_per_step']} page faults, {r['system_seconds_per_step']:.4f} s system time per step",
        f"memory       {mem_text}",
        f"FLOPs/image  {flops * 1e3:.3f} GFLOP (fwd+bwd, counted)"
        if flops is not None
        else "FLOPs/image  (skipped)",
        f"achieved     {r['achieved_tflops']:.4f} TFLOP/s" if r["achieved_tflops"] else "achieved     -",
        f"MFU          {r['mfu'] * 100:.2f} % of {r['peak_tflops']} TFLOP/s"
        if r["mfu"] is not None
        else "MFU          - (pass --peak_tflops)",
    ]
    if r.get("breakdown"):
        lines.append(format_breakdown(r["breakdown"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure_host_memory()  # as train.py does: the step measured as it runs in training
    result = run_benchmark(args)
    print(format_result(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
