"""The memory plan's host table against the peak RSS a real model load and checkpoint save reach.

    python bench/host_memory_plan.py --model builtin:sd15-arch [--workdir DIR] [--json PATH]
    python bench/host_memory_plan.py --model builtin:tiny-sd1       # seconds, for a quick look

Each phase runs in a fresh process on the CPU, which reports its RSS after the imports and the
peak RSS (`VmHWM` of /proc/self/status, reset through /proc/self/clear_refs before the phase)
while the phase runs; the difference is what the phase added on top of the libraries:

* `load_folder`: `load_model(MODEL)`, the built-in's cached diffusers folder (fp32). Its
  safetensors files are memory-mapped, so the weights become resident as they are first read;
  the phase reads every weight once (as the first step or the move to the GPU does);
* `load_single_file`: `load_model(FILE)`, the same model exported once as an fp16 single file
  (`save_single_file`, as checkpoints write it): the file's tensors, converted to fp32 components;
* `save`: the checkpoint save's exports of the loaded model (`save_pipeline` and the fp16
  `save_single_file` that `trainer.checkpointing.contents` writes), of weights made resident
  first (trained weights are no longer pages of the mapped file).

The plan's side is `plan_memory(...).host` of a CPU run of that model (`--device cpu`): its
load phase (`model_file` + `model_components`) and its `checkpoint_save` category. Linux only
(/proc). SD1.5 needs about 10 GB of RAM and some minutes; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

_PRELUDE = """
import gc, json, sys
from pathlib import Path
import torch
from trainer.models import load_model, save_pipeline, save_single_file

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

def modules(model):
    return (model.unet, model.vae, model.text_encoder)

def reset_peak():
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
"""

PHASES = {
    "load_folder": """
reset_peak(); base = status("VmRSS")
model = load_model(sys.argv[1])
loaded = status("VmRSS")
touched = sum(float(p.detach().sum()) for m in modules(model) for p in m.parameters())  # page the mmap in
print(json.dumps({"base": base, "peak": status("VmHWM"), "after": status("VmRSS"), "loaded": loaded}))
""",
    "load_single_file": """
reset_peak(); base = status("VmRSS")
model = load_model(sys.argv[2])
print(json.dumps({"base": base, "peak": status("VmHWM"), "after": status("VmRSS")}))
""",
    "save": """
model = load_model(sys.argv[1])
for m in modules(model):  # resident, as weights a run has trained are (not pages of the mapped file)
    for p in m.parameters():
        p.data = p.data.clone()
out = Path(sys.argv[3])
reset_peak(); base = status("VmRSS")
save_pipeline(model, out / "pipeline")
save_single_file(model, out / "model.safetensors", dtype=torch.float16)
print(json.dumps({"base": base, "peak": status("VmHWM"), "after": status("VmRSS")}))
""",
}

_EXPORT = """
save_single_file(load_model(sys.argv[1]), Path(sys.argv[2]), dtype=torch.float16)
"""


def _run(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _PRELUDE + code, *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if result.returncode != 0:
        raise SystemExit(f"phase failed:\n{result.stderr[-3000:]}")
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def measure(model: str, workdir: Path) -> dict[str, dict]:
    workdir.mkdir(parents=True, exist_ok=True)
    single = workdir / f"{model.replace(':', '-')}-fp16.safetensors"
    if not single.is_file():
        _run(_EXPORT, model, str(single))
    out = {}
    for phase, code in PHASES.items():
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            out[phase] = _run(code, model, str(single), tmp)
    out["single_file"] = {"path": str(single)}
    return out


def planned(model: str, single_file: str, workdir: Path) -> dict[str, dict]:
    """The host plan of a CPU run (fp32, no autocast) of `model`, and of its single file."""
    from trainer.config import load_config
    from trainer.optim import load_optimizer_file
    from trainer.plan import plan_memory

    opt = workdir / "optimizer.json"
    opt.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-6}}))
    out = {}
    for name, spec in (("folder", model), ("single_file", single_file)):
        args = ["--resume_ckpt", spec, "--optimizer_config", str(opt), "--mixed_precision", "no"]
        args += ["--cache_latents", "true", "--resolution", "64", "--batch_size", "1"]
        args += ["--logdir", str(workdir / "logs"), "--save_precision", "fp16"]
        cfg = load_config(None, args)
        host = plan_memory(
            cfg, load_optimizer_file(cfg.optimizer_config), device="cpu", with_advice=False
        ).host
        out[name] = {"categories": host.categories, "phases": host.phases, "total": host.total_bytes}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:sd15-arch")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "host-memory-plan")
    parser.add_argument("--json", type=Path, help="write plan and measurements here")
    args = parser.parse_args(argv)
    measured = measure(args.model, args.workdir)
    plan = planned(args.model, measured["single_file"]["path"], args.workdir)
    folder, single = plan["folder"]["categories"], plan["single_file"]["categories"]
    rows = [
        ("model load, diffusers folder", folder["model_file"] + folder["model_components"], "load_folder"),
        (
            "model load, fp16 single file",
            single["model_file"] + single["model_components"],
            "load_single_file",
        ),
        ("checkpoint save (pipeline + fp16 file)", folder["checkpoint_save"], "save"),
    ]
    print(f"{args.model} on the CPU: what each phase adds to the process's RSS (peak - before)")
    print(f"  {'phase':<40} {'plan GiB':>9} {'measured GiB':>13} {'plan/measured':>14}")
    for label, plan_bytes, phase in rows:
        m = measured[phase]
        got = m["peak"] - m["base"]
        print(f"  {label:<40} {plan_bytes / GIB:>9.2f} {got / GIB:>13.2f} {plan_bytes / max(got, 1):>14.2f}")
    base = measured["load_folder"]["base"]
    print(
        f"  {'libraries (RSS after the imports)':<40} {folder['libraries'] / GIB:>9.2f} {base / GIB:>13.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "measured": measured, "plan": plan}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
