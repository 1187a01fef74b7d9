"""Benchmark the whole training loop (the real `train.py`) beside the bare step of bench/step.py.

    python bench/loop.py                       # tiny SD1, 256 px, batch 4, AdamW fp32, UNet + TE
    python bench/loop.py --epochs 5 --repeats 2 --train_py OTHER_CHECKOUT/train.py
    python bench/loop.py --phases     # and split the loop's CPU time: step vs the loop's own

Whole-loop seconds per optimizer step = (t(N epochs) - t(1 epoch)) / steps of the extra epochs,
each t the wall time of a fresh `train.py` process: start-up, model load, the final save and
exit cancel out, what remains is what a step costs in the loop (data loading, VAE encode of
every image, step, optimizer, logging, bookkeeping). The same work is then timed by
bench/step.py (synthetic batches, no data loader) and the ratio loop / step printed: the loop's
overhead over the bare step. Both are also given in CPU seconds per step (the processes' user +
system time, all threads and loader workers): on a shared machine these move far less with
the load than wall time, and with the passive OpenMP wait (below) a waiting thread costs none.

The data: `--images` generated PNGs (flat shapes on flat backgrounds, deterministic) with
`.txt` captions, written with a train.json and an optimizer.json into a temporary folder (or
`--workdir`). `--train_py` times another checkout's train.py on the same data and settings
(before/after comparisons: bench/step.py then runs from that checkout too).
`--phases` runs the long configuration once more inside one process, timing the loop's
forward + backward and optimizer steps: what is left is the loop's own cost (data loading,
bookkeeping, logging, the final save spread over the steps), without any start-up difference.
Timings on a shared machine are noisy: compare interleaved runs and read the load average that
is printed with each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout, not installed (as bench/step.py)
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (245, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """`count` captioned shape images of `size`x`size` pixels (same files for the same arguments)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        fg, bg = rng.sample(sorted(COLOURS), 2)
        shape = rng.choice(SHAPES)
        img = Image.new("RGB", (size, size), COLOURS[bg])
        draw = ImageDraw.Draw(img)
        r = rng.randint(size // 6, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[fg])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[fg])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[fg])
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {fg} {shape} on a {bg} background\n")


def write_config(work: Path, args: argparse.Namespace, epochs: int) -> Path:
    """train.json + optimizer.json for the benchmark's work; returns the train.json path."""
    optimizer = {"base": {"optimizer": "adamw", "lr": args.lr, "lr_scheduler": "constant"}}
    (work / "optimizer.json").write_text(json.dumps(optimizer))
    config = {
        "resume_ckpt": args.model,
        "data_root": str(work / "images"),
        "logdir": str(work / "logs"),
        "project_name": f"loop{epochs}",
        "optimizer_config": str(work / "optimizer.json"),
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "max_epochs": epochs,
        "lr": args.lr,
        "mixed_precision": "no",
        "cache_latents": False,
        "disable_textenc_training": args.freeze_text_encoder,
        "cond_dropout": 0.0,
        "flip_p": 0.0,
        "sample_prompts": None,
        "validation_config": None,
        "save_optimizer": False,
        "keep_last_checkpoints": 1,
        "log_step": args.log_step,
        "seed": 42,
    }
    if args.num_workers is not None:
        config["num_workers"] = args.num_workers
    path = work / f"train{epochs}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment of the timed processes: the OpenMP wait policy and spin count that
    trainer/runtime/threads.py gives a training process (unless the caller's environment sets them),
    written out so that bench/step.py, which does not configure threads itself, runs the same
    way; OMP_NUM_THREADS when --threads is given."""
    from trainer.runtime.threads import available_cpus, plan_threads

    env = dict(os.environ)
    plan = plan_threads(env, available_cpus())
    if plan.wait_policy is not None:
        env.setdefault("OMP_WAIT_POLICY", plan.wait_policy)
    if plan.spin_count is not None:
        env.setdefault("GOMP_SPINCOUNT", plan.spin_count)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_train(train_py: Path, config: Path, threads: int | None) -> tuple[float, float]:
    """Wall and CPU seconds of one `train.py --config CONFIG` process (raises if it fails)."""
    env = dict(thread_env(threads), PYTHONPATH=str(train_py.resolve().parent))
    cpu_before, started = _children_cpu(), time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(train_py), "--config", str(config)],
        env=env,
        cwd=config.parent,
        capture_output=True,
        text=True,
    )
    elapsed, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
    if done.returncode != 0:
        raise SystemExit(f"{train_py} --config {config} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed, cpu


def time_step(train_py: Path, args: argparse.Namespace) -> tuple[float, float | None]:
    """Median wall and CPU s/step of bench/step.py (of the checkout holding `train_py`) on the
    same work (CPU None from a bench/step.py that does not report it)."""
    bench_step = train_py.resolve().parent / "bench" / "step.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        cmd = [
            sys.executable,
            str(bench_step),
            f"--model={args.model}",
            f"--resolution={args.resolution}",
            f"--batch_size={args.batch_size}",
            "--optimizer=adamw",
            f"--lr={args.lr}",
            "--precision=no",
            f"--steps={args.step_steps}",
            "--no_flops",
            "--json",
            str(out),
        ]
        if args.freeze_text_encoder:
            cmd.append("--freeze_text_encoder")
        if args.threads:
            cmd.append(f"--threads={args.threads}")
        subprocess.run(
            cmd, check=True, stdout=subprocess.DEVNULL, env=dict(thread_env(args.threads), PYTHONPATH="")
        )
        result = json.loads(out.read_text())
        return result["seconds_per_step_median"], result.get("cpu_seconds_per_step_median")


class _Timed:
    """A part of the session (its TrainingStep, its optimizer set) whose named methods add their
    CPU seconds to `spent[label]`; every other attribute is the part's own."""

    def __init__(self, inner, spent: dict[str, float], labels: dict[str, str]):
        self._inner, self._spent, self._labels = inner, spent, labels

    def _timed(self, fn, label: str):
        def wrapper(*args, **kwargs):
            started = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._spent[label] += time.process_time() - started

        return wrapper

    def __call__(self, *args, **kwargs):
        return self._timed(self._inner, self._labels["__call__"])(*args, **kwargs)

    def __getattr__(self, name: str):
        value = getattr(self._inner, name)
        return self._timed(value, self._labels[name]) if name in self._labels else value


def loop_phases(config: Path) -> dict:
    """Run the loop of `trainer` (the one on sys.path) in this process on `config`, timing its
    micro-steps (forward + backward) and optimizer steps; the loop's own share is the rest:
    data loading, bookkeeping, logging (and the final save, spread over the steps). CPU seconds
    of this process per optimizer step (a loader worker's own time is not in them)."""
    from trainer.runtime.host_memory import configure_host_memory
    from trainer.runtime.threads import configure_threads

    configure_threads()  # before torch loads, as train.py does
    configure_host_memory()
    from trainer.config import load_config
    from trainer.run.loop import train
    from trainer.run.session import build_session

    spent = {"forward + backward": 0.0, "optimizer step": 0.0}
    session = build_session(load_config(str(config), []))
    # The session's own step and optimizer, timed where the loop calls them (no loop internals)
    session.parts.step = _Timed(session.step, spent, {"__call__": "forward + backward"})
    session.parts.optim = _Timed(
        session.optim, spent, {"backward": "forward + backward", "step": "optimizer step"}
    )
    started = time.process_time()
    try:
        summary = train(session)
    finally:
        session.close()
    total = time.process_time() - started
    steps = summary.global_step
    result = {name: t / steps for name, t in spent.items()}
    result["loop's own (data, bookkeeping, save)"] = (total - sum(spent.values())) / steps
    result["total"] = total / steps
    return result


def time_phases(train_py: Path, config: Path, threads: int | None) -> dict:
    """`loop_phases` in a fresh process importing the trainer next to `train_py`."""
    env = dict(thread_env(threads), PYTHONPATH=str(train_py.resolve().parent))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phases_of", str(config)]
    done = subprocess.run(cmd, env=env, cwd=config.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"loop phases failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny-sd1")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--images", type=int, default=20, help="generated training images")
    p.add_argument("--epochs", type=int, default=5, help="long run; the short run has 1 epoch")
    p.add_argument("--repeats", type=int, default=1, help="(short, long, step) rounds, interleaved")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--log_step", type=int, default=25, help="train.json log_step")
    p.add_argument(
        "--num_workers", type=int, default=None, help="train.json num_workers (default: automatic)"
    )
    p.add_argument("--freeze_text_encoder", action="store_true", help="train the UNet only")
    p.add_argument("--step_steps", type=int, default=10, help="timed steps of bench/step.py")
    p.add_argument("--no_step", action="store_true", help="skip bench/step.py")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS / torch threads")
    p.add_argument("--train_py", type=Path, default=HERE.parent / "train.py", help="the train.py to time")
    p.add_argument("--workdir", type=Path, default=None, help="keep data and runs here")
    p.add_argument(
        "--phases", action="store_true", help="also split a long run's CPU time: step vs the loop's own"
    )
    p.add_argument("--phases_of", type=Path, default=None, help=argparse.SUPPRESS)  # internal
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.phases_of is not None:
        print(json.dumps(loop_phases(args.phases_of)))
        return 0
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the short run has 1)")
    if args.images % args.batch_size:
        raise SystemExit(f"--images {args.images} must be a multiple of --batch_size {args.batch_size}")
    steps = (args.epochs - 1) * args.images // args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_images(work / "images", args.images, args.resolution)
        short, long = write_config(work, args, 1), write_config(work, args, args.epochs)
        for i in range(args.repeats):
            (t1, c1), (tn, cn) = (
                time_train(args.train_py, short, args.threads),
                time_train(args.train_py, long, args.threads),
            )
            loop = (tn - t1) / steps
            line = (
                f"round {i + 1}: loop {loop:.4f} s/step (t1 {t1:.1f} s, t{args.epochs} {tn:.1f} s; "
                f"CPU {(cn - c1) / steps:.4f} s/step)"
            )
            if not args.no_step:
                bare, bare_cpu = time_step(args.train_py, args)
                line += f", bare step {bare:.4f} s/step, loop/step {loop / bare:.3f}"
                if bare_cpu:
                    line += f" (CPU {bare_cpu:.4f} s/step, loop/step {(cn - c1) / steps / bare_cpu:.3f})"
            print(f"{line}  [load average {load_average()}]", flush=True)
        if args.phases:
            phases = time_phases(args.train_py, long, args.threads)
            own = phases["loop's own (data, bookkeeping, save)"]
            text = ", ".join(f"{name} {t:.4f}" for name, t in phases.items())
            print(
                f"CPU s/step in the loop: {text}; the loop's own share {own / phases['total'] * 100:.1f} %"
                f"  [load average {load_average()}]"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
