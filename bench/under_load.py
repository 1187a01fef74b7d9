"""Training-step time on an idle machine and under load, with and without the thread settings.

    python bench/under_load.py                      # 8 busy processes, 2 rounds, both policies
    python bench/under_load.py --busy 8 --steps 6 --rounds 3 --policy torch --policy auto

For each round and each policy it runs a fresh child process that times `--steps` training
steps of the quick start's model and shape (bench/step.py's step: builtin:tiny-sd1, 128 px,
batch 4, AdamW, cached latents), once on the machine as it is ("idle") and once with `--busy`
spinning Python processes started beside it ("loaded"). The busy processes stop themselves
after `--busy_limit` seconds and are killed when each measurement ends. Policies:

* `torch`: `SDTRAINER_THREADS=torch`, torch's and OpenMP's own defaults (before the fix);
* `auto`: the trainer's thread settings (trainer/runtime/threads.py), what `train.py` uses;
* a number N: `SDTRAINER_THREADS=N`;
* `torch+passive`: torch's thread counts, only the OpenMP wait policy changed to PASSIVE.

Runs are interleaved (policy A idle, A loaded, B idle, B loaded, next round ...) so the noise of
a shared machine hits every policy alike; the table gives the median seconds/step per policy
and the slowdown ratio loaded / idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPIN = "import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"


def policy_env(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT)
    if policy == "torch+passive":
        env.update(SDTRAINER_THREADS="torch", OMP_WAIT_POLICY="PASSIVE")
    else:
        env["SDTRAINER_THREADS"] = policy
    return env


def child(steps: int, out: Path) -> None:
    """In a fresh process: thread settings first (before torch loads), then time the step."""
    from trainer.runtime.threads import configure_threads

    plan = configure_threads()
    sys.path.insert(0, str(ROOT / "bench"))
    import step as step_bench

    args = step_bench.build_parser().parse_args(
        ["--model", "builtin:tiny-sd1", "--resolution", "128", "--batch_size", "4", "--optimizer", "adamw"]
        + ["--cache_latents", "--no_flops", "--warmup", "1", "--steps", str(steps)]
    )
    result = step_bench.run_benchmark(args)
    out.write_text(
        json.dumps({"seconds_per_step": result["seconds_per_step_median"], "plan": plan.summary()})
    )


def measure(policy: str, steps: int, busy: int, busy_limit: float) -> dict:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN.format(limit=busy_limit)]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            started = time.perf_counter()
            try:
                subprocess.run(
                    [sys.executable, __file__, "--child", str(out), "--steps", str(steps)],
                    env=policy_env(policy),
                    check=True,
                    timeout=busy_limit,
                )
            except subprocess.TimeoutExpired:  # a figure too: slower than the limit allows
                return {"seconds_per_step": float("inf"), "plan": policy, "wall_s": f"> {busy_limit:.0f}"}
            result = json.loads(out.read_text())
            result["wall_s"] = round(time.perf_counter() - started, 1)
            return result
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", action="append", help="torch | auto | torch+passive | N (repeatable)")
    p.add_argument("--busy", type=int, default=8, help="busy background processes when loaded")
    p.add_argument("--busy_limit", type=float, default=300.0, help="seconds a busy process lives at most")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        child(args.steps, args.child)
        return 0
    policies = args.policy or ["torch", "auto"]
    print(
        f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs "
        f"available, load average {os.getloadavg()[0]:.1f} at start; {args.busy} busy processes when loaded"
    )
    times: dict[tuple[str, str], list[float]] = {}
    plans: dict[str, str] = {}
    for r in range(args.rounds):
        for policy in policies:
            for label, busy in (("idle", 0), ("loaded", args.busy)):
                result = measure(policy, args.steps, busy, args.busy_limit)
                times.setdefault((policy, label), []).append(result["seconds_per_step"])
                plans[policy] = result["plan"]
                print(
                    f"round {r + 1} {policy:>9} {label:>6}: {result['seconds_per_step']:.3f} s/step "
                    f"(child wall {result['wall_s']} s, load avg {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    print(f"\n{'policy':>9} | idle s/step | loaded s/step | slowdown")
    for policy in policies:
        idle = statistics.median(times[(policy, "idle")])
        loaded = statistics.median(times[(policy, "loaded")])
        print(f"{policy:>9} | {idle:11.3f} | {loaded:13.3f} | {loaded / idle:6.1f}x   ({plans[policy]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
