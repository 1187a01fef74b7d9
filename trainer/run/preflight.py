"""Checks that need no model, run before it loads (loading takes 30-60 s on a real model).

`check_inputs` reads every file the config names (data_root, optimizer_config, sample_prompts,
validation_config, resume_ckpt, vae) and checks that the attention kernel can run, and reports
all problems at once, each naming its key and path, so a typo costs seconds and leaves no run
folder behind. Only cheap checks: data_root needs one image file name (decoding is discovery's
job, after the load); optimizer.json is parsed and validated (names, keys, schedules).
`finished_message` says when an exact resume has nothing left to train.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from trainer.checkpointing.store import MANIFEST, TRAINING_STATE
from trainer.runtime.errors import ConfigError, TrainerError

BUILTIN_PREFIX = "builtin:"


def check_inputs(cfg) -> None:
    """Raise ConfigError listing every input the run would fail on later."""
    problems = []
    checks = (
        _data_root,
        _optimizer_config,
        _sample_prompts,
        _validation_config,
        _resume_ckpt,
        _vae,
        _attention,
        _wandb,
    )
    for check in checks:
        try:
            check(cfg)
        except TrainerError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems with the inputs:\n  " + "\n  ".join(problems))


def _data_root(cfg) -> None:
    from trainer.data.discovery import require_an_image_file

    require_an_image_file(cfg.data_root)


def _optimizer_config(cfg) -> None:
    from trainer.optim.schema import load_optimizer_file  # the loader the build uses, so no drift

    load_optimizer_file(cfg.optimizer_config)


def _wandb(cfg) -> None:
    """wandb: true needs the package; found missing only when the metrics start, the run folder
    and the loaded model would come first."""
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb: true but the 'wandb' package is not installed; pip install wandb")


def _attention(cfg) -> None:
    """attn_type xformers where it cannot run (not installed, no CUDA) fails after the load
    otherwise; the session trains on CUDA when it is available, else on the CPU."""
    if cfg.attn_type != "xformers":
        return
    import torch

    from trainer.parts.attention import xformers_problem

    if problem := xformers_problem("cuda" if torch.cuda.is_available() else "cpu"):
        raise ConfigError(problem)


def _sample_prompts(cfg) -> None:
    if cfg.sample_prompts is None:
        return
    from trainer.eval.sampling import load_sample_jobs  # parses the file; no model needed

    load_sample_jobs(
        cfg.sample_prompts, resolution=cfg.resolution, default_seed=cfg.seed, fallback_captions=[]
    )


def _validation_config(cfg) -> None:
    from trainer.data.validation_split import load_validation_config

    load_validation_config(cfg.validation_config)


def _resume_ckpt(cfg) -> None:
    """resume_ckpt must be findlast, builtin:NAME, a checkpoint of ours, a diffusers folder or a
    single file; say what it is instead (a run folder, a training state, ...) and what to give."""
    spec = cfg.resume_ckpt
    if spec == "findlast" or spec.startswith(BUILTIN_PREFIX):
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(
            f"resume_ckpt: '{spec}' does not exist. Give a diffusers folder, a .safetensors/.ckpt file, "
            "a checkpoint folder of this trainer, findlast or builtin:NAME (see docs/MODELS.md)"
        )
    if path.is_dir():
        if (path / MANIFEST).is_file() or (path / "model_index.json").is_file():
            return
        if (path / "checkpoints").is_dir():
            raise ConfigError(
                f"resume_ckpt: '{spec}' is a run folder, not a checkpoint. Give one of its checkpoints "
                f"({path / 'checkpoints'}/<name>), or --resume_ckpt findlast for the newest"
            )
        if any((child / MANIFEST).is_file() for child in path.iterdir() if child.is_dir()):
            raise ConfigError(
                f"resume_ckpt: '{spec}' is a folder of checkpoints; give one of them, or findlast"
            )
        raise ConfigError(
            f"resume_ckpt: '{spec}' is a folder with neither {MANIFEST} (a checkpoint of this trainer) "
            "nor model_index.json (a diffusers pipeline)"
        )
    if path.name == TRAINING_STATE:
        raise ConfigError(
            f"resume_ckpt: '{spec}' is a training state, not a model; give its checkpoint folder "
            f"--resume_ckpt {path.parent}"
        )
    from trainer.models.checkpoint_io import SINGLE_FILE_SUFFIXES

    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ConfigError(
            f"resume_ckpt: '{spec}' is not a model file (expected one of {', '.join(SINGLE_FILE_SUFFIXES)})"
        )


def _vae(cfg) -> None:
    if cfg.vae is None or cfg.vae.startswith(BUILTIN_PREFIX):
        return
    if not Path(cfg.vae).expanduser().exists():
        raise ConfigError(f"vae: '{cfg.vae}' does not exist (set vae to null to keep the model's VAE)")


def finished_message(cfg, manifest: dict, path: Path) -> str | None:
    """Why an exact resume of the checkpoint at `path` would train nothing, with how to go on;
    None when there is work left. Decided from the manifest alone (nothing is loaded)."""
    epoch, step = int(manifest["epoch"]), int(manifest["global_step"])
    if epoch >= cfg.max_epochs:
        return (
            f"'{path}' is a finished run: it trained {epoch} epochs ({step} optimizer steps) and max_epochs "
            f"is {cfg.max_epochs}. Nothing to do, nothing written. To train further, raise max_epochs "
            f"(e.g. --max_epochs {epoch + max(1, epoch // 2)}); to start over, give another resume_ckpt."
        )
    if cfg.stop_at_step is not None and step >= cfg.stop_at_step:
        return (
            f"'{path}' is already at step {step} and stop_at_step is {cfg.stop_at_step}. Nothing to do, "
            "nothing written. To train further, raise stop_at_step or set it to null."
        )
    return None
