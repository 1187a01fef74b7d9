"""kohya -> this trainer: model, data, captions, noise, precision, attention and compilation.

One small function per key (or per pair of keys that only make sense together), registered in
`CONVERTERS`. Conversion rules whose meaning differs are spelled out where they are applied and
in docs/MIGRATING.md:

* `noise_offset` x is `zero_frequency_noise_ratio` x (same formula: x * N(0,1) per sample and
  channel). kohya's offset is off by default, ours is 0.02, so an absent/0 offset writes 0.
  `noise_offset_random_strength` scales it by a U(0,1) draw: kohya draws once per batch, this
  trainer once per sample.
* `keep_tokens` N counts the first caption chunk; our main prompt (chunk 0) always stays in
  place and `keep_tags` counts the tags after it: keep_tags = max(N - 1, 0).
* `flip_aug` flips with probability 0.5: flip_p 0.5.
* `xformers` on is `attn_type: xformers` where the xformers package is installed; where it is
  not, `attn_type: sdp` (PyTorch SDPA, the same family of memory-efficient attention kernels,
  built into torch), said in the key's row. Otherwise the imported file could not train here:
  the trainer refuses xformers it cannot load rather than switch kernels silently.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from trainer.importing.rows import DEFAULT, NOT_SUPPORTED, OFF, Row

_COMPILE_BACKENDS = ("inductor", "cudagraphs", "aot_eager", "eager")
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_LOSSES = {"l2": "mse", "huber": "huber", "smooth_l1": "smooth_l1"}
SD_RESOLUTIONS = "512 for SD1.x, 768 for SD2.x 768-v (with v2 and v_parameterization)"


def _model(ctx) -> None:
    if ctx.get("sdxl"):
        ctx.row(
            Row(
                "sdxl",
                True,
                NOT_SUPPORTED,
                note=(
                    "this trainer trains SD1.x and SD2.x only, not SDXL. Set resume_ckpt to an SD1.5 or SD2.x model "
                    f"(diffusers folder, .safetensors or .ckpt) and resolution to {SD_RESOLUTIONS}; the SDXL-only keys "
                    "are listed as having no counterpart"
                ),
            )
        )
    elif ctx.has("sdxl"):
        ctx.row(Row("sdxl", ctx.raw("sdxl"), OFF, note="SD1.x/2.x: nothing to change"))
    model = ctx.get("pretrained_model_name_or_path")
    if model is not None:
        ctx.result.set_train(
            "resume_ckpt",
            model,
            "pretrained_model_name_or_path",
            model,
            "a Hub model id is not downloaded: point it at a local file or folder",
        )
    if ctx.has("vae"):
        if ctx.get("vae"):
            ctx.result.set_train("vae", ctx.get("vae"), "vae", ctx.get("vae"))
        else:
            ctx.row(Row("vae", ctx.raw("vae"), OFF, note="the model's own VAE"))
    if ctx.has("v2"):
        ctx.row(Row("v2", ctx.raw("v2"), OFF, note="the SD1/SD2 architecture is read from the model itself"))
    vpred = bool(ctx.get("v_parameterization"))
    note = "" if ctx.has("v_parameterization") else "kohya trains epsilon unless v_parameterization is set"
    target = "v_prediction" if vpred else "epsilon"
    status = "mapped" if ctx.has("v_parameterization") else DEFAULT
    ctx.result.set_train(
        "prediction_type", target, "v_parameterization", ctx.raw("v_parameterization"), note, status=status
    )


def parse_resolution(value: Any) -> tuple[int, str]:
    """kohya's `512`, `"512"`, `"768,512"` or `[768, 512]` -> (our square-area resolution, note)."""
    if isinstance(value, str):
        parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = [int(p) for p in value]
    else:
        parts = [int(value)]
    w, h = (parts[0], parts[0]) if len(parts) == 1 else parts[:2]
    side = math.sqrt(w * h)
    res = min(2048, max(64, int(round(side / 64)) * 64))
    note = "" if w == h == res else f"buckets of about {w}x{h}'s area: {res} (multiple of 64)"
    return res, note


def _data(ctx) -> None:
    key = "max_resolution" if ctx.has("max_resolution") else "resolution"
    if ctx.get(key) is not None:
        res, note = parse_resolution(ctx.get(key))
        ctx.result.set_train("resolution", res, key, ctx.raw(key), note)
    if ctx.get("train_data_dir"):
        ctx.result.set_train(
            "data_root",
            ctx.get("train_data_dir"),
            "train_data_dir",
            ctx.get("train_data_dir"),
            "kohya's N_name folders: repeats go to multiply.txt (see the folder rows)",
        )
    elif ctx.has("train_data_dir"):
        ctx.row(
            Row(
                "train_data_dir",
                ctx.raw("train_data_dir"),
                OFF,
                note="empty: set data_root (or use a dataset config)",
            )
        )
    batch = ctx.get("train_batch_size")
    status = "mapped" if batch is not None else DEFAULT
    ctx.result.set_train(
        "batch_size",
        int(batch or 1),
        "train_batch_size",
        ctx.raw("train_batch_size"),
        "" if batch else "kohya's default",
        status=status,
    )
    if ctx.has("max_data_loader_n_workers"):
        workers = ctx.get("max_data_loader_n_workers")
        ctx.result.set_train(
            "num_workers",
            int(workers or 0),
            "max_data_loader_n_workers",
            ctx.raw("max_data_loader_n_workers"),
        )
    if ctx.has("cache_latents"):
        ctx.result.set_train(
            "cache_latents", bool(ctx.get("cache_latents")), "cache_latents", ctx.raw("cache_latents")
        )


def _captions(ctx) -> None:
    if ctx.has("shuffle_caption"):
        ctx.result.set_train(
            "shuffle_tags", bool(ctx.get("shuffle_caption")), "shuffle_caption", ctx.raw("shuffle_caption")
        )
    if ctx.has("keep_tokens"):
        n = int(ctx.get("keep_tokens") or 0)
        ctx.result.set_train(
            "keep_tags",
            max(n - 1, 0),
            "keep_tokens",
            ctx.raw("keep_tokens"),
            "kohya counts the first chunk, which always stays first here",
        )
    rate = ctx.get("caption_dropout_rate")
    status = "mapped" if ctx.has("caption_dropout_rate") else DEFAULT
    ctx.result.set_train(
        "cond_dropout",
        float(rate or 0.0),
        "caption_dropout_rate",
        ctx.raw("caption_dropout_rate"),
        "" if status == "mapped" else "kohya's default 0 (ours 0.04)",
        status=status,
    )
    if ctx.has("flip_aug"):
        ctx.result.set_train(
            "flip_p",
            0.5 if ctx.get("flip_aug") else 0.0,
            "flip_aug",
            ctx.raw("flip_aug"),
            "kohya flips half the images" if ctx.get("flip_aug") else "",
        )
    ext = ctx.get("caption_extension") or ctx.get("caption_extention")
    key = "caption_extension" if ctx.has("caption_extension") else "caption_extention"
    if ext is not None:
        if ext.lower() in (".txt", ".caption"):
            ctx.row(Row(key, ext, OFF, note="no key needed: .txt and .caption sidecars are always read"))
        else:
            ctx.row(
                Row(
                    key,
                    ext,
                    NOT_SUPPORTED,
                    note="only .txt / .caption (and .yaml/.json) sidecars are read: rename the files",
                )
            )


def _noise(ctx) -> None:
    offset = ctx.get("noise_offset") or 0.0
    status = "mapped" if ctx.has("noise_offset") else DEFAULT
    note = "same formula" if offset else "kohya: off unless set (ours defaults to 0.02)"
    ctx.result.set_train(
        "zero_frequency_noise_ratio",
        float(offset),
        "noise_offset",
        ctx.raw("noise_offset"),
        note,
        status=status,
    )
    if ctx.has("noise_offset_random_strength"):
        if ctx.get("noise_offset_random_strength") and offset:
            ctx.result.set_train(
                "noise_offset_random_strength",
                True,
                "noise_offset_random_strength",
                ctx.raw("noise_offset_random_strength"),
                "strength drawn per sample (kohya: per batch)",
            )
        else:
            note = "no offset noise" if not offset else "off in the source"
            ctx.row(
                Row("noise_offset_random_strength", ctx.raw("noise_offset_random_strength"), OFF, note=note)
            )
    iterations = ctx.get("multires_noise_iterations")
    if iterations:
        discount = ctx.get("multires_noise_discount")
        discount = 0.3 if discount is None else float(discount)
        ctx.result.set_train(
            "pyramid_noise_discount",
            discount,
            "multires_noise_discount",
            discount,
            "EveryDream2's pyramid noise",
        )
        ctx.result.set_train(
            "multires_noise_iterations", int(iterations), "multires_noise_iterations", iterations, "levels"
        )
    else:
        for key in ("multires_noise_iterations", "multires_noise_discount"):
            if ctx.has(key):
                ctx.row(Row(key, ctx.raw(key), OFF, note="multires noise is off without iterations"))
    if ctx.has("min_snr_gamma"):
        gamma = ctx.get("min_snr_gamma")
        ctx.result.set_train(
            "min_snr_gamma", float(gamma) if gamma else None, "min_snr_gamma", ctx.raw("min_snr_gamma")
        )
    if ctx.has("zero_terminal_snr"):
        ctx.result.set_train(
            "enable_zero_terminal_snr",
            bool(ctx.get("zero_terminal_snr")),
            "zero_terminal_snr",
            ctx.raw("zero_terminal_snr"),
        )
    for key, ours, fallback in (
        ("min_timestep", "timestep_start", 0),
        ("max_timestep", "timestep_end", 1000),
    ):
        if ctx.has(key):
            value = ctx.get(key)
            ctx.result.set_train(ours, int(fallback if value is None else value), key, ctx.raw(key))
    if ctx.has("loss_type"):
        loss = ctx.get("loss_type") or "l2"
        if loss in _LOSSES:
            ctx.result.set_train("loss_type", _LOSSES[loss], "loss_type", loss)
        else:
            ctx.row(Row("loss_type", loss, NOT_SUPPORTED, note="no L1 loss here; mse is used"))
            ctx.result.train["loss_type"] = "mse"


def _precision(ctx) -> None:
    mp = ctx.get("mixed_precision")
    status = "mapped" if mp is not None else DEFAULT
    mp = mp or "no"
    if mp not in ("no", "fp16", "bf16"):
        ctx.row(
            Row(
                "mixed_precision",
                mp,
                NOT_SUPPORTED,
                note="kohya knows no, fp16, bf16; the default (auto) is used",
            )
        )
    else:
        note = "" if status == "mapped" else "kohya's default is fp32"
        ctx.result.set_train(
            "mixed_precision", mp, "mixed_precision", ctx.raw("mixed_precision"), note, status=status
        )
    if ctx.has("full_bf16"):
        if ctx.get("full_bf16"):
            ctx.result.set_train(
                "weight_dtype", "bf16", "full_bf16", True, "bf16 weights, here with stochastic rounding"
            )
        else:
            ctx.row(Row("full_bf16", False, OFF, note="fp32 weights"))
    if ctx.has("gradient_checkpointing"):
        ctx.result.set_train(
            "gradient_checkpointing",
            bool(ctx.get("gradient_checkpointing")),
            "gradient_checkpointing",
            ctx.raw("gradient_checkpointing"),
        )
    if ctx.has("gradient_accumulation_steps"):
        ctx.result.set_train(
            "grad_accum",
            int(ctx.get("gradient_accumulation_steps") or 1),
            "gradient_accumulation_steps",
            ctx.raw("gradient_accumulation_steps"),
        )


def xformers_installed() -> bool:
    """Whether the xformers package can be found (by name only: importing it loads torch/CUDA)."""
    return importlib.util.find_spec("xformers") is not None


def _attention(ctx) -> None:
    xf = ctx.get("xformers")
    if ctx.has("xformers"):
        if (xf is True or xf == "xformers") and xformers_installed():
            ctx.result.set_train("attn_type", "xformers", "xformers", ctx.raw("xformers"))
        elif xf is True or xf == "xformers":
            note = (
                "xformers is not installed here: PyTorch SDPA, the same family of memory-efficient "
                "attention kernels, built into torch (pip install xformers and set attn_type xformers "
                "to use it)"
            )
            ctx.result.set_train("attn_type", "sdp", "xformers", ctx.raw("xformers"), note)
        else:
            ctx.result.set_train("attn_type", "sdp", "xformers", ctx.raw("xformers"), "PyTorch SDPA")
    if ctx.has("sdpa"):
        ctx.row(Row("sdpa", ctx.raw("sdpa"), OFF, note="SDPA (attn_type sdp) is the default"))
    backend = ctx.get("dynamo_backend")
    compile_on = ctx.get("torch_compile") if ctx.kind == "toml" else backend not in (None, "no")
    if ctx.has("torch_compile"):
        ctx.result.set_train(
            "compile",
            bool(compile_on and backend in (None, *_COMPILE_BACKENDS)),
            "torch_compile",
            ctx.raw("torch_compile"),
        )
    if ctx.has("dynamo_backend"):
        if not compile_on:
            ctx.row(Row("dynamo_backend", ctx.raw("dynamo_backend"), OFF, note="compilation is off"))
        elif backend in _COMPILE_BACKENDS:
            ctx.result.train["compile"] = True
            ctx.result.set_train("compile_backend", backend, "dynamo_backend", backend, "compile = true")
        else:
            ctx.row(
                Row(
                    "dynamo_backend",
                    backend,
                    NOT_SUPPORTED,
                    note=f"backends here: {', '.join(_COMPILE_BACKENDS)}; compile stays off",
                )
            )
    if ctx.has("dynamo_mode"):
        mode = ctx.get("dynamo_mode")
        if ctx.result.train.get("compile") and mode in _COMPILE_MODES:
            ctx.result.set_train("compile_mode", mode, "dynamo_mode", mode)
        else:
            ctx.row(
                Row(
                    "dynamo_mode",
                    ctx.raw("dynamo_mode"),
                    OFF,
                    note="compilation is off"
                    if not ctx.result.train.get("compile")
                    else f"modes: {', '.join(_COMPILE_MODES)}",
                )
            )


CONVERTERS = (_model, _data, _captions, _noise, _precision, _attention)
