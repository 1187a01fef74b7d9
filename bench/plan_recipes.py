"""Print the memory plan of every example recipe and of the issue's four SD1.5 recipes.

    python bench/plan_recipes.py [--vram 8] [--json PATH]

Example recipes (examples/train/*.json) whose `resume_ckpt` is a file that is not here are
planned on the built-in architecture of the same family (`builtin:sd15-arch` / `sd21-arch`),
which has the same shapes. The issue's hand counts (issue 31) are for SD1.5 at 512 px, batch 1,
cached latents; the four recipes below are planned with exactly those settings, through the
trainer's own config loading and the plan's public functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.optim import load_optimizer_file  # noqa: E402
from trainer.plan import Evaluator, plan_json, plan_memory, plan_table  # noqa: E402

GIB = 2**30
ISSUE = {  # name -> (optimizer.json base, train.json overrides); issue 31's hand counts in GiB
    "AdamW fp32": ({"optimizer": "adamw"}, ["--mixed_precision", "no"], "15.5-16.5"),
    "AdamW8bit + fp16 autocast": ({"optimizer": "adamw8bit"}, ["--mixed_precision", "fp16"], "9.5-10"),
    "lowvram_sd15.json": (None, ["--config_file", "examples/train/lowvram_sd15.json"], "4.5-5.1"),
    "Adafactor + bf16 weights + fused": (
        {"optimizer": "adafactor", "relative_step": False, "scale_parameter": False, "lr": 1e-6},
        ["--weight_dtype", "bf16", "--fused_back_pass", "true", "--mixed_precision", "bf16"],
        "5.2-5.7",
    ),
}


def example_configs() -> list[tuple[str, list[str]]]:
    out = []
    for path in sorted((ROOT / "examples" / "train").glob("*.json")):
        spec = json.loads(path.read_text())["resume_ckpt"]
        overrides = []
        if not spec.startswith("builtin:") and not (ROOT / spec).exists():
            arch = "builtin:sd21-arch" if "2-1" in spec or "sd21" in path.name else "builtin:sd15-arch"
            overrides = ["--resume_ckpt", arch]
        out.append((str(path.relative_to(ROOT)), overrides))
    return out


def issue_recipe(name: str, workdir: Path):
    base, extra, _ = ISSUE[name]
    if extra[:1] == ["--config_file"]:
        return load_config(str(ROOT / extra[1]), ["--optimizer_config", str(ROOT / "optimizer.json")])
    path = workdir / f"opt-{len(list(workdir.iterdir()))}.json"
    path.write_text(json.dumps({"base": {"lr": 1e-6, **base}}))
    args = [
        "--resume_ckpt",
        "builtin:sd15-arch",
        "--resolution",
        "512",
        "--batch_size",
        "1",
        "--cache_latents",
        "true",
    ]
    return load_config(None, [*args, "--optimizer_config", str(path), *extra])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vram", type=float, default=8.0, help="budget in GiB for the example recipes")
    parser.add_argument("--json", type=Path, help="also write every plan as JSON here")
    args = parser.parse_args(argv)
    budget = int(args.vram * GIB)
    report = {}
    for config, overrides in example_configs():
        cfg = load_config(str(ROOT / config), overrides)
        optimizer = cfg.optimizer_config and str(ROOT / cfg.optimizer_config)
        plan = plan_memory(
            cfg,
            load_optimizer_file(optimizer),
            device="cuda",
            budget_bytes=budget,
            budget_source=f"vram {args.vram:g} GiB",
        )
        print(f"## {config} {' '.join(overrides)}\n\n{plan_table(plan)}\n")
        report[config] = plan_json(plan)
    print("## the issue's SD1.5 recipes (512 px, batch 1, cached latents)\n")
    print(
        "| recipe | issue's hand count GiB | planned, allocated GiB | planned with CUDA context and margin GiB |"
    )
    print("|---|---|---|---|")
    evaluator = Evaluator("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, _, hand) in ISSUE.items():
            cfg = issue_recipe(name, Path(tmp))
            optimizer = load_optimizer_file(cfg.optimizer_config)
            categories = evaluator(cfg, optimizer).categories
            allocated = sum(v for k, v in categories.items() if k not in ("cuda_context", "allocator_margin"))
            total = sum(categories.values())
            print(f"| {name} | {hand} | {allocated / GIB:.2f} | {total / GIB:.2f} |")
            report[name] = categories
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
