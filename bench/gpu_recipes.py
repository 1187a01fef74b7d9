"""The memory rows of docs/REAL_MODELS.md section 5, measured as the trainer runs them.

Each row is a recipe (a train.json of examples/train/ with the overrides that row names) run
by the trainer itself, in this process: `build_session` + `loop.train` on generated 512 px
(768 px for SD2.1-v) images, with the full-size random-weight architecture in place of the
user's model file. The peak is over the whole run, so it holds what steady steps do not: the
first step (optimizer states allocated), a sample (the pipeline's UNet + VAE decode, after the
first step so the states are there), a validation pass and the checkpoint save at the end.

The run is two optimizer steps long: memory does not grow with the step count, and a save of
the full-size model costs seconds of disk writes per row (its folder is removed afterwards).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loop import write_images  # bench/loop.py: captioned shape images

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    """One memory row: the GPU size it is for, the train.json, the overrides that make the row."""

    row: str  # docs/REAL_MODELS.md section 5's row and column
    train_json: str  # relative to the checkout
    model: str  # the full-size built-in with that architecture
    dry_model: str  # the tiny one with the same family, for the CPU dry run
    overrides: dict = field(default_factory=dict)
    optimizer: str | None = None  # replaces the recipe's optimizer.json's optimizer


RECIPES = (
    Recipe("8 GB, SD1.5 512 px", "examples/train/lowvram_sd15.json", "builtin:sd15-arch", "builtin:tiny-sd1"),
    Recipe(
        "12 GB, SD1.5 512 px",
        "examples/train/sd15_single_file.json",
        "builtin:sd15-arch",
        "builtin:tiny-sd1",
        {"batch_size": 2},
    ),
    Recipe(
        "16 GB, SD1.5 512 px",
        "examples/train/sd15_single_file.json",
        "builtin:sd15-arch",
        "builtin:tiny-sd1",
        {"batch_size": 4},
    ),
    Recipe(
        "24 GB, SD1.5 512 px: fp32 AdamW",
        "examples/train/sd15_single_file.json",
        "builtin:sd15-arch",
        "builtin:tiny-sd1",
        {"batch_size": 8},
        optimizer="adamw",
    ),
    Recipe(
        "SD2.1-v 768 px", "examples/train/sd21v_single_file.json", "builtin:sd21-arch", "builtin:tiny-sd2"
    ),
)


def recipe_settings(recipe: Recipe, work: Path, *, dry: bool) -> dict:
    """The CLI overrides of one row's run: its model, a dataset of two optimizer steps, one
    sample after the first step, a one-image validation set, the save at the end."""
    cfg = json.loads((ROOT / recipe.train_json).read_text())
    batch = recipe.overrides.get("batch_size", cfg.get("batch_size", 1))
    accum = recipe.overrides.get("grad_accum", cfg.get("grad_accum", 1))
    resolution = 64 if dry else cfg.get("resolution", 512)
    write_images(work / "train", 2 * batch * accum, resolution)
    write_images(work / "val", 1, resolution, seed=1)
    (work / "samples.json").write_text(
        json.dumps(
            {
                "seed": 1,
                "num_inference_steps": 2,
                "generate_pretrain_samples": False,
                "samples": [{"prompt": "a"}],
            }
        )
    )
    validation = {
        "validate_training": True,
        "val_split_mode": "manual",
        "manual_data_root": str(work / "val"),
    }
    (work / "validation.json").write_text(json.dumps(validation | {"stabilize_training_loss": False}))
    optimizer_config = cfg.get("optimizer_config", "optimizer.json")
    opt = json.loads((ROOT / optimizer_config).read_text())
    if recipe.optimizer is not None:
        opt["base"]["optimizer"] = recipe.optimizer
    (work / "optimizer.json").write_text(json.dumps(opt))
    return {
        **recipe.overrides,
        "resume_ckpt": recipe.dry_model if dry else recipe.model,
        "resolution": resolution,
        "data_root": str(work / "train"),
        "logdir": str(work / "logs"),
        "optimizer_config": str(work / "optimizer.json"),
        "sample_prompts": str(work / "samples.json"),
        "sample_steps": 1,
        "validation_config": str(work / "validation.json"),
        "max_epochs": 1,
        "num_workers": 0,
        "save_every_n_epochs": None,
    }


def run_recipe(recipe: Recipe, work: Path, *, dry: bool, device: torch.device) -> dict:
    """Train the row's two steps and return the peak memory and what the run did."""
    from step import _memory, _reset_peak  # bench/step.py's peak memory, CUDA or CPU

    from trainer.config import load_config
    from trainer.run.loop import train
    from trainer.run.session import build_session

    settings = recipe_settings(recipe, work, dry=dry)
    argv = [arg for key, value in settings.items() for arg in (f"--{key}", _cli(value))]
    cfg = load_config(str(ROOT / recipe.train_json), argv)
    free_device_memory(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    scope = "whole run" if _reset_peak(device) != "process" else "process"
    started = time.monotonic()
    session = build_session(cfg)
    try:
        summary = train(session)
    finally:
        session.close()
        release_fused_hooks(session.optim)
    run = session.run.path
    result = {
        "memory": _memory(device, scope),
        "allocated_before_gib": round(before / 2**30, 3),  # what an earlier part left behind
        "train_s": round(time.monotonic() - started, 1),
        "steps": summary.global_step,
        "samples": len(list((run / "samples").rglob("*.png"))) if (run / "samples").exists() else 0,
        "validated": summary.final_val_loss is not None,
        "checkpoints": len(summary.checkpoints),
        "settings": {k: v for k, v in settings.items() if k not in ("data_root", "logdir")},
        "config": {k: getattr(cfg, k) for k in _RECIPE_KEYS},
    }
    del session, summary
    shutil.rmtree(work / "logs", ignore_errors=True)  # GBs of checkpoint per row
    free_device_memory(device)
    return result


_RECIPE_KEYS = (
    "resolution",
    "batch_size",
    "grad_accum",
    "mixed_precision",
    "weight_dtype",
    "gradient_checkpointing",
    "fused_back_pass",
    "cache_latents",
)


def _cli(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def free_device_memory(device: torch.device) -> None:
    """Collect, then return the allocator's cached blocks: a dropped build held in reference
    cycles stays allocated until the collector runs, and `empty_cache` alone would leave it
    counted in the next peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def release_fused_hooks(optim) -> None:
    """Remove the fused back pass's per-parameter hooks, so a dropped build can be freed at all.

    They close a reference cycle through C++ (parameter -> its post-accumulate-grad hook ->
    closure -> optimizer -> parameter) that Python's cycle collector cannot see: without this,
    a fused build's weights and optimizer states stay allocated for the rest of the process and
    in every later peak (measured on CPU: tests/test_gpu_suite.py). The optimizer set's public
    `close()` removes them (a no-op for a plain set, and a second call does nothing)."""
    optim.close()
