"""Command-line entry: `sdtrainer [SUBCOMMAND]`; training parses, builds, trains, summarises and
maps errors to exit codes. The other subcommands are thin doors to their own modules.

Exit codes: 0 finished (max_epochs or stop_at_step reached, or nothing left to train), 2 bad
input (config, data, model, checkpoint) or a run folder in use by another process, 3 stopped on
purpose (repeated non-finite losses or non-finite weights; the last good state is named), 4 a
checkpoint could not be written (disk full, I/O error; the partial folder is removed and the last
intact checkpoint named), 130 interrupted by SIGINT/SIGTERM (state saved; a second signal: at
once, not saved).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

from trainer.config import load_config
from trainer.runtime.console import progress_safe_logging
from trainer.runtime.errors import RunFinished, TrainerError
from trainer.runtime.host_memory import configure_host_memory
from trainer.runtime.signals import StopFlag
from trainer.runtime.threads import configure_threads

log = logging.getLogger("trainer")

NORMAL_ENDS = ("finished", "stop_at_step")

# subcommand -> "module:function" taking argv and returning an exit code (imported when used,
# so `sdtrainer --help` and training load nothing they do not need)
SUBCOMMANDS = {
    "plan": "trainer.plan.command:main",
    "extract-lora": "trainer.extract_lora:main",  # sets the CPU threads before torch loads
    "preview": "trainer.data.preview:main",
    "import-config": "trainer.importing.command:main",
    "convert": "trainer.models.convert:main",
}


def split_config_arg(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--config PATH` (or `--config=PATH`) out of argv; the rest are key overrides."""
    rest, config = [], None
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--config="):
            config = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return config, rest


def setup_console_logging(level: int | None = None) -> None:
    """INFO on the main process; other ranks of a distributed run only warn (no duplicate lines)."""
    if level is None:
        level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("PIL", "urllib3", "matplotlib", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """`sdtrainer SUBCOMMAND ...`, or training (`sdtrainer [train] --config ...`, `python train.py`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        module, function = SUBCOMMANDS[argv[0]].split(":")
        return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)
    if argv and argv[0] == "train":
        argv = argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        from trainer.cli_help import train_help

        print(train_help())
        return 0
    return _train(argv)


def _train(argv: list[str]) -> int:
    setup_console_logging()
    session = None
    try:
        config_path, overrides = split_config_arg(argv)
        cfg = load_config(config_path, overrides)  # seed -1 is resolved by build_session (resume)
        configure_threads()  # before torch loads: OpenMP reads its wait policy once
        host_memory = configure_host_memory()
        from trainer.run.loop import train  # heavy imports (torch, diffusers) only after the config is valid
        from trainer.run.session import build_session

        session = build_session(cfg)
        log.info("%s", host_memory.summary())  # in train.log, beside the thread settings
        with StopFlag() as stop, progress_safe_logging():  # signal handlers only around the run
            summary = train(session, stop)
        _report(summary, session)
        return 0 if summary.status in NORMAL_ENDS else 130
    except RunFinished as exc:
        log.info("%s", exc)
        return exc.exit_code
    except TrainerError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted: stopped without saving (the last saved checkpoint is unchanged)")
        return 130
    finally:
        if session is not None:
            session.close()  # after the summary / error is in train.log


def _report(summary, session) -> None:
    if not session.accelerator.is_main_process:
        return
    lines = [
        f"run {summary.status}: {summary.global_step} optimizer steps, {summary.epoch} epochs, "
        f"{summary.samples_seen} images in {summary.seconds:.0f}s",
        f"final train loss: {summary.final_loss:.4f}"
        if summary.final_loss is not None
        else "final train loss: n/a",
        f"run folder: {session.run.path}",
    ]
    if summary.final_val_loss is not None:
        lines.append(f"validation loss: final {summary.final_val_loss:.4f}, best {summary.best_val_loss:.4f}")
    lines += [f"checkpoint: {p}" for p in summary.checkpoints]
    if summary.nonfinite_steps:
        lines.append(f"non-finite steps skipped: {summary.nonfinite_steps}")
    problems = session.data.problems
    if problems:
        lines.append(f"{len(problems)} data problem(s):")
        lines += [f"  {p}" for p in problems]
    lines += how_to_use(summary.checkpoints[-1]) if summary.checkpoints else []
    log.info("summary:\n  %s", "\n  ".join(lines))


def how_to_use(checkpoint: Path) -> list[str]:
    """Where the single file goes for the usual tools, and how diffusers loads the checkpoint."""
    files = sorted(checkpoint.glob("*.safetensors"))
    pipeline = checkpoint / "pipeline"
    lines = [f"model file: {f}" for f in files]
    if files:
        lines += [
            "  A1111 / Forge: copy it into stable-diffusion-webui/models/Stable-diffusion/",
            "  ComfyUI: copy it into ComfyUI/models/checkpoints/ and pick it in 'Load Checkpoint'",
        ]
    lines += [
        "  diffusers: from diffusers import StableDiffusionPipeline; "
        f"pipe = StableDiffusionPipeline.from_pretrained({str(pipeline)!r})",
        f"  continue training: --resume_ckpt findlast, or --resume_ckpt {checkpoint}",
    ]
    return lines
