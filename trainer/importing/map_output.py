"""kohya -> this trainer: saving cadence and format, sampling, seed, text encoder, logging.

Same shape as map_options: one small converter per key group, one row per source key. kohya saves
nothing resumable unless `save_state` is set and samples nothing without a prompt file, so both
are written explicitly (our defaults differ).
"""

from __future__ import annotations

from pathlib import Path

from trainer.importing.rows import DEFAULT, NOT_SUPPORTED, OFF, Row


def _saving(ctx) -> None:
    if ctx.get("output_dir"):
        ctx.result.set_train(
            "logdir",
            ctx.get("output_dir"),
            "output_dir",
            ctx.get("output_dir"),
            "run folders and checkpoints go under it",
        )
    if ctx.get("output_name"):
        name = str(ctx.get("output_name")).replace("/", "_").replace("\\", "_")
        ctx.result.set_train("project_name", name, "output_name", ctx.get("output_name"))
    if ctx.has("save_every_n_epochs"):
        n = ctx.get("save_every_n_epochs")
        ctx.result.set_train(
            "save_every_n_epochs",
            int(n) if n else None,
            "save_every_n_epochs",
            ctx.raw("save_every_n_epochs"),
            "" if n else "0/unset: only the final save",
        )
    if ctx.has("save_last_n_epochs"):
        n = ctx.get("save_last_n_epochs")
        ctx.result.set_train(
            "keep_last_checkpoints",
            int(n) if n else None,
            "save_last_n_epochs",
            ctx.raw("save_last_n_epochs"),
        )
    state = ctx.get("save_state")
    status = "mapped" if ctx.has("save_state") else DEFAULT
    ctx.result.set_train(
        "save_optimizer",
        bool(state),
        "save_state",
        ctx.raw("save_state"),
        "true makes checkpoints resumable (our default)" if not state else "",
        status=status,
    )
    fmt = ctx.get("save_model_as")
    if fmt is not None:
        diffusers_only = fmt.startswith("diffusers")
        note = "a diffusers folder is always written" + (
            "" if fmt != "ckpt" else "; the single file is .safetensors, not .ckpt"
        )
        ctx.result.set_train("no_save_ckpt", diffusers_only, "save_model_as", fmt, note)
    prec = ctx.get("save_precision")
    if prec is not None:
        ours = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(str(prec))
        if ours is None:
            ctx.row(Row("save_precision", prec, NOT_SUPPORTED, note="use fp16, bf16 or float"))
        else:
            note = "kohya's 'float'" if prec == "float" else ""
            ctx.result.set_train("save_precision", ours, "save_precision", prec, note)
    elif ctx.has("save_precision"):
        ctx.row(
            Row(
                "save_precision",
                ctx.raw("save_precision"),
                OFF,
                note="single file in fp16 (save_precision null)",
            )
        )


def _sampling(ctx) -> None:
    prompts = ctx.get("sample_prompts")
    if not prompts:
        ctx.result.set_train(
            "sample_prompts",
            None,
            "sample_prompts",
            ctx.raw("sample_prompts"),
            "no prompt file: no samples, as in kohya",
            status="mapped" if ctx.has("sample_prompts") else DEFAULT,
        )
    elif Path(prompts).is_file() and " --" not in Path(prompts).read_text(encoding="utf-8", errors="replace"):
        ctx.result.set_train("sample_prompts", prompts, "sample_prompts", prompts, "one prompt per line")
    else:
        ctx.result.train["sample_prompts"] = None
        ctx.row(
            Row(
                "sample_prompts",
                prompts,
                NOT_SUPPORTED,
                note=(
                    "kohya's per-line options (--n --w --h --d --l --s) are not read from .txt here, or the file is missing: "
                    "write a sample_prompts.json (docs/LOGGING.md); samples are off"
                ),
            )
        )
    steps = ctx.get("sample_every_n_steps")
    if steps:
        ctx.result.set_train("sample_steps", int(steps), "sample_every_n_steps", steps)
    elif ctx.has("sample_every_n_steps"):
        ctx.row(Row("sample_every_n_steps", ctx.raw("sample_every_n_steps"), OFF, note="unset"))
    first = bool(ctx.get("sample_at_first"))
    status = "mapped" if ctx.has("sample_at_first") else DEFAULT
    ctx.result.set_train(
        "sample_at_start",
        first,
        "sample_at_first",
        ctx.raw("sample_at_first"),
        "" if status == "mapped" else "kohya's default",
        status=status,
    )


def _run(ctx) -> None:
    seed = ctx.get("seed")
    status = "mapped" if ctx.has("seed") else DEFAULT
    note = "" if seed is not None else "kohya picks a random seed when unset (GUI: 0)"
    ctx.result.set_train(
        "seed", int(seed) if seed is not None else -1, "seed", ctx.raw("seed"), note, status=status
    )
    if ctx.has("clip_skip"):
        n = ctx.get("clip_skip")
        if n is None or int(n) <= 4:
            ctx.result.set_train(
                "clip_skip",
                int(n or 0),
                "clip_skip",
                ctx.raw("clip_skip"),
                "same rule: final_layer_norm(hidden_states[-n])" if n else "",
            )
        else:
            ctx.row(Row("clip_skip", n, NOT_SUPPORTED, note="clip_skip is 0-4 here"))
    if ctx.has("max_token_length"):
        n = ctx.get("max_token_length")
        n = 75 if n in (None, 75) else int(n)
        ctx.result.set_train(
            "max_token_length",
            n,
            "max_token_length",
            ctx.raw("max_token_length"),
            "75-token chunks, as kohya",
        )
    log_with = ctx.get("log_with")
    if log_with is not None:
        ctx.result.set_train(
            "wandb", log_with in ("wandb", "all"), "log_with", log_with, "TensorBoard is always written"
        )
    if ctx.get("wandb_run_name"):
        ctx.result.set_train(
            "run_name", ctx.get("wandb_run_name"), "wandb_run_name", ctx.get("wandb_run_name")
        )
    elif ctx.has("wandb_run_name"):
        ctx.row(Row("wandb_run_name", ctx.raw("wandb_run_name"), OFF, note="unset"))


CONVERTERS = (_saving, _sampling, _run)
