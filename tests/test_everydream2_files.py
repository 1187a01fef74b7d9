"""EveryDream2's own shipped files, unchanged, against this trainer (issue 14).

The test cannot fetch EveryDream2 at run time, and its files are not copied into this repository.
Instead the keys and values of each file, as EveryDream2 ships them (victorchall/EveryDream2trainer
at 5098db8), are written out below as one dict per file: the types and sloppy spellings that
matter (seed -1, a string "true", per-sample cfgs, dead keys, nulls, findlast) are kept, while
the prose of their help-text keys ("doc", "documentation") is replaced by "...", which neither
trainer reads. The test writes them as JSON into a scratch folder laid out like an EveryDream2
checkout and runs there, so the relative paths inside them resolve as they do for a user. Only
what must point at this machine is given on the command line, as a user would: data_root, the
model (a tiny built-in one), 64 px and one step (stop_at_step) to keep it under a minute on CPU.
"""

from __future__ import annotations

import json
import logging

import pytest

from tests.helpers import copy_images
from trainer.checkpointing import WEIGHTS
from trainer.eval import sampling

# train.json
TRAIN_JSON = {
    "attn_type": "sdp",
    "batch_size": 8,
    "ckpt_every_n_minutes": None,
    "clip_grad_norm": None,
    "clip_skip": 0,
    "cond_dropout": 0.04,
    "data_root": "/mnt/q/training_samples/ff7r/man",
    "disable_amp": False,
    "disable_textenc_training": False,
    "embedding_perturbation": 0.0,
    "flip_p": 0.0,
    "gpuid": 0,
    "gradient_checkpointing": True,
    "grad_accum": 1,
    "logdir": "logs",
    "log_step": 25,
    "loss_type": "mse",
    "max_epochs": 40,
    "notebook": False,
    "optimizer_config": "optimizer.json",
    "project_name": "project_abc",
    "resolution": 512,
    "resume_ckpt": "panopstor/EveryDream",
    "run_name": None,
    "sample_prompts": "sample_prompts.txt",
    "sample_steps": 300,
    "save_ckpt_dir": None,
    "save_ckpts_from_n_epochs": 0,
    "save_every_n_epochs": 20,
    "save_optimizer": False,
    "seed": -1,
    "timestep_start": 0,
    "timestep_end": 1000,
    "shuffle_tags": False,
    "validation_config": "validation_default.json",
    "wandb": False,
    "write_schedule": False,
    "zero_frequency_noise_ratio": 0.02,
    "pyramid_noise_discount": 0.03,
    "enable_zero_terminal_snr": False,
    "load_settings_every_epoch": False,
    "min_snr_gamma": 5.0,
    "ema_decay_rate": None,
    "ema_strength_target": None,
    "ema_update_interval": None,
    "ema_device": None,
    "ema_sample_nonema_model": False,
    "ema_sample_ema_model": False,
    "ema_resume_model": None,
}

# trainSD21.json
TRAIN_SD21_JSON = {
    "amp": True,
    "batch_size": 6,
    "ckpt_every_n_minutes": None,
    "clip_grad_norm": None,
    "clip_skip": 0,
    "cond_dropout": 0.04,
    "data_root": "X:\\my_project_data\\project_abc",
    "disable_textenc_training": False,
    "disable_xformers": False,
    "flip_p": 0.0,
    "gpuid": 0,
    "gradient_checkpointing": True,
    "grad_accum": 1,
    "logdir": "logs",
    "log_step": 25,
    "lowvram": False,
    "lr": 2e-06,
    "lr_decay_steps": 0,
    "lr_scheduler": "constant",
    "lr_warmup_steps": None,
    "max_epochs": 30,
    "notebook": False,
    "optimizer_config": "optimizerSD21.json",
    "project_name": "project_abc_sd21",
    "resolution": 768,
    "resume_ckpt": "stabilityai/stable-diffusion-2-1",
    "sample_prompts": "sample_prompts.txt",
    "sample_steps": 300,
    "save_ckpt_dir": None,
    "save_ckpts_from_n_epochs": 0,
    "save_every_n_epochs": 20,
    "save_optimizer": False,
    "scale_lr": False,
    "seed": 555,
    "shuffle_tags": False,
    "validation_config": "validation_default.json",
    "wandb": False,
    "write_schedule": False,
    "rated_dataset": False,
    "rated_dataset_target_dropout_percent": 50,
    "zero_frequency_noise_ratio": 0.02,
    "enable_zero_terminal_snr": False,
    "load_settings_every_epoch": False,
    "min_snr_gamma": None,
    "ema_decay_rate": None,
    "ema_strength_target": None,
    "ema_update_interval": None,
    "ema_device": None,
    "ema_sample_nonema_model": False,
    "ema_sample_ema_model": False,
    "ema_resume_model": None,
}

# chain0.json
CHAIN0_JSON = {
    "amp": False,
    "batch_size": 12,
    "ckpt_every_n_minutes": None,
    "clip_grad_norm": None,
    "clip_skip": 0,
    "cond_dropout": 0.0,
    "data_root": "R:\\everydream-trainer\\training_samples\\ff7r",
    "disable_textenc_training": False,
    "disable_xformers": True,
    "flip_p": 0.0,
    "ed1_mode": True,
    "gpuid": 0,
    "gradient_checkpointing": True,
    "grad_accum": 1,
    "logdir": "logs",
    "log_step": 25,
    "lowvram": False,
    "lr": 2.5e-06,
    "lr_decay_steps": 0,
    "lr_scheduler": "constant",
    "lr_warmup_steps": None,
    "max_epochs": 15,
    "project_name": "myproj_ch0",
    "resolution": 384,
    "resume_ckpt": "sd_v1-5_vae",
    "sample_prompts": "sample_prompts.txt",
    "sample_steps": 300,
    "save_ckpt_dir": None,
    "save_every_n_epochs": 99,
    "save_optimizer": False,
    "scale_lr": False,
    "seed": -1,
    "shuffle_tags": False,
    "useadam8bit": True,
    "wandb": False,
    "write_schedule": True,
}

# chain1.json
CHAIN1_JSON = {
    "amp": False,
    "batch_size": 7,
    "ckpt_every_n_minutes": None,
    "clip_grad_norm": None,
    "clip_skip": 0,
    "cond_dropout": 0.05,
    "data_root": "R:\\everydream-trainer\\training_samples\\ff7r",
    "disable_textenc_training": False,
    "disable_xformers": True,
    "flip_p": 0.0,
    "ed1_mode": True,
    "gpuid": 0,
    "gradient_checkpointing": True,
    "grad_accum": 1,
    "logdir": "logs",
    "log_step": 25,
    "lowvram": False,
    "lr": 1e-06,
    "lr_decay_steps": 0,
    "lr_scheduler": "constant",
    "lr_warmup_steps": None,
    "max_epochs": 10,
    "project_name": "myproj_ch0",
    "resolution": 512,
    "resume_ckpt": "findlast",
    "sample_prompts": "sample_prompts.txt",
    "sample_steps": 300,
    "save_ckpt_dir": None,
    "save_every_n_epochs": 5,
    "save_optimizer": False,
    "scale_lr": False,
    "seed": -1,
    "shuffle_tags": False,
    "useadam8bit": True,
    "wandb": False,
    "write_schedule": True,
}

# chain2.json
CHAIN2_JSON = {
    "amp": False,
    "batch_size": 2,
    "ckpt_every_n_minutes": None,
    "clip_grad_norm": None,
    "clip_skip": 0,
    "cond_dropout": 0.08,
    "data_root": "R:\\everydream-trainer\\training_samples\\ff7r",
    "disable_textenc_training": True,
    "disable_xformers": True,
    "flip_p": 0.0,
    "ed1_mode": True,
    "gpuid": 0,
    "gradient_checkpointing": True,
    "grad_accum": 5,
    "logdir": "logs",
    "log_step": 25,
    "lowvram": False,
    "lr": 1.5e-06,
    "lr_decay_steps": 0,
    "lr_scheduler": "constant",
    "lr_warmup_steps": None,
    "max_epochs": 10,
    "project_name": "myproj_ch0",
    "resolution": 640,
    "resume_ckpt": "findlast",
    "sample_prompts": "sample_prompts.txt",
    "sample_steps": 300,
    "save_ckpt_dir": None,
    "save_every_n_epochs": 5,
    "save_optimizer": False,
    "scale_lr": False,
    "seed": -1,
    "shuffle_tags": False,
    "useadam8bit": True,
    "wandb": False,
    "write_schedule": True,
}

# optimizer.json
OPTIMIZER_JSON = {
    "doc": {
        "base": "...",
        "text_encoder_overrides": "...",
        "text_encoder_lr_scale": "...",
        "-----------------": "...",
        "optimizer": "...",
        "optimizer_desc": "...",
        "lr": "...",
        "lr_scheduler": "...",
        "lr_warmup_steps": "...",
        "lr_decay_steps": "...",
        "betas": "...",
        "epsilon": "...",
        "weight_decay": "...",
        "------------------": "...",
        "unfreeze_last_n_layers": "...",
    },
    "base": {
        "optimizer": "adamw8bit",
        "lr": 1e-06,
        "lr_scheduler": "constant",
        "lr_decay_steps": None,
        "lr_warmup_steps": None,
        "betas": [0.9, 0.999],
        "epsilon": 1e-08,
        "weight_decay": 0.01,
    },
    "text_encoder_overrides": {
        "optimizer": None,
        "lr": 5e-07,
        "lr_scheduler": "cosine",
        "lr_decay_steps": None,
        "lr_warmup_steps": None,
        "betas": None,
        "epsilon": None,
        "weight_decay": None,
    },
    "text_encoder_freezing": {"unfreeze_last_n_layers": None},
    "apply_grad_scaler_step_tweaks": True,
}

# optimizerSD21.json
OPTIMIZER_SD21_JSON = {
    "doc": {
        "base": "...",
        "text_encoder_overrides": "...",
        "text_encoder_lr_scale": "...",
        "-----------------": "...",
        "optimizer": "...",
        "optimizer_desc": "...",
        "lr": "...",
        "lr_scheduler": "...",
        "lr_warmup_steps": "...",
        "lr_decay_steps": "...",
        "betas": "...",
        "epsilon": "...",
        "weight_decay": "...",
        "------------------": "...",
        "freeze_embeddings": "...",
        "freeze_front_n_layers": "...",
        "freeze_final_layer_norm": "...",
    },
    "base": {
        "optimizer": "adamw8bit",
        "lr": 1e-06,
        "lr_scheduler": "constant",
        "lr_decay_steps": None,
        "lr_warmup_steps": None,
        "betas": [0.9, 0.999],
        "epsilon": 1e-08,
        "weight_decay": 0.01,
    },
    "text_encoder_overrides": {
        "optimizer": None,
        "lr": 3e-07,
        "lr_scheduler": None,
        "lr_decay_steps": None,
        "lr_warmup_steps": None,
        "betas": None,
        "epsilon": None,
        "weight_decay": None,
    },
    "text_encoder_freezing": {"unfreeze_last_n_layers": 2},
}

# optimizer_dadapt.json
OPTIMIZER_DADAPT_JSON = {
    "doc": {
        "base": "...",
        "text_encoder_overrides": "...",
        "text_encoder_lr_scale": "...",
        "-----------------": "...",
        "optimizer": "...",
        "optimizer_desc": "...",
        "lr": "...",
        "lr_scheduler": "...",
        "lr_warmup_steps": "...",
        "lr_decay_steps": "...",
        "betas": "...",
        "epsilon": "...",
        "weight_decay": "...",
        "d0": "...",
        "decouple": "...",
        "momentum": "...",
        "------------------": "...",
        "freeze_embeddings": "...",
        "freeze_front_n_layers": "...",
        "freeze_final_layer_norm": "...",
    },
    "base": {
        "optimizer": "dadapt_adam",
        "lr": 0.1,
        "lr_scheduler": "constant",
        "lr_decay_steps": None,
        "lr_warmup_steps": None,
        "betas": [0.9, 0.999],
        "epsilon": 1e-08,
        "weight_decay": 0.8,
        "d0": 1e-06,
        "decouple": True,
    },
    "text_encoder_overrides": {
        "optimizer": None,
        "lr": 0.1,
        "lr_scheduler": None,
        "lr_decay_steps": None,
        "lr_warmup_steps": None,
        "betas": None,
        "epsilon": 1e-08,
        "weight_decay": 0.8,
        "d0": 1e-06,
        "decouple": True,
    },
    "text_encoder_freezing": {"unfreeze_last_n_layers": None},
    "apply_grad_scaler_step_tweaks": True,
}

# sample_prompts.json
SAMPLE_PROMPTS_JSON = {
    "batch_size": 3,
    "seed": 555,
    "cfgs": [7, 4],
    "scheduler": "dpm++",
    "num_inference_steps": 15,
    "show_progress_bars": True,
    "samples": [
        {
            "prompt": "ted bennet and a man sitting on a sofa with a kitchen in the background",
            "negative_prompt": "distorted, deformed",
        },
        {"prompt": "a photograph of ted bennet riding a bicycle", "seed": -1},
        {"random_caption": True, "seed": 555, "cfgs": [1, 11], "size": [640, 384]},
    ],
}

# validation_default.json
VALIDATION_DEFAULT_JSON = {
    "documentation": {
        "validate_training": "...",
        "val_split_mode": "...",
        "auto_split_proportion": "...",
        "manual_data_root": "...",
        "extra_manual_datasets": "...",
        "stabilize_training_loss": "...",
        "stabilize_split_proportion": "...",
        "every_n_epochs": "...",
        "seed": "...",
        "use_relative_loss": "...",
    },
    "validate_training": True,
    "val_split_mode": "automatic",
    "auto_split_proportion": 0.15,
    "manual_data_root": None,
    "extra_manual_datasets": {},
    "stabilize_training_loss": False,
    "stabilize_split_proportion": 0.15,
    "every_n_epochs": 1,
    "seed": 555,
    "use_relative_loss": False,
}

# cfgs/train_coco.json
TRAIN_COCO_JSON = {
    "amp": True,
    "batch_size": 10,
    "ckpt_every_n_minutes": None,
    "clip_grad_norm": None,
    "clip_skip": 0,
    "cond_dropout": 1.0,
    "data_root": "Q:/mldata/coco2017/train2017",
    "disable_textenc_training": False,
    "disable_xformers": False,
    "flip_p": 0.0,
    "gpuid": 0,
    "gradient_checkpointing": False,
    "grad_accum": 1,
    "logdir": "logs",
    "log_step": 25,
    "lowvram": False,
    "lr": 1e-06,
    "lr_decay_steps": 0,
    "lr_scheduler": "constant",
    "lr_warmup_steps": None,
    "max_epochs": 10,
    "notebook": False,
    "optimizer_config": "optimizer.json",
    "project_name": "coco_test",
    "resolution": 512,
    "resume_ckpt": "SD15",
    "run_name": None,
    "sample_prompts": "sample_prompts.txt",
    "sample_steps": 300,
    "save_ckpt_dir": None,
    "save_ckpts_from_n_epochs": 0,
    "save_every_n_epochs": 1,
    "save_optimizer": False,
    "scale_lr": False,
    "seed": 555,
    "shuffle_tags": False,
    "validation_config": "cfgs/validation_coco.json",
    "wandb": True,
    "write_schedule": False,
    "rated_dataset": False,
    "rated_dataset_target_dropout_percent": 50,
    "zero_frequency_noise_ratio": 0.04,
}

# cfgs/validation_coco.json
VALIDATION_COCO_JSON = {
    "documentation": {
        "validate_training": "...",
        "val_split_mode": "...",
        "val_split_proportion": "...",
        "val_data_root": "...",
        "stabilize_training_loss": "...",
        "stabilize_split_proportion": "...",
        "every_n_epochs": "...",
        "seed": "...",
    },
    "validate_training": "true",
    "val_split_mode": "manual",
    "val_data_root": "Q:/mldata/coco2017/val2017",
    "val_split_proportion": 0.15,
    "stabilize_training_loss": True,
    "stabilize_split_proportion": 0.15,
    "every_n_epochs": 1,
    "seed": 555,
}


FILES = {
    "train.json": TRAIN_JSON,
    "trainSD21.json": TRAIN_SD21_JSON,
    "chain0.json": CHAIN0_JSON,
    "chain1.json": CHAIN1_JSON,
    "chain2.json": CHAIN2_JSON,
    "optimizer.json": OPTIMIZER_JSON,
    "optimizerSD21.json": OPTIMIZER_SD21_JSON,
    "optimizer_dadapt.json": OPTIMIZER_DADAPT_JSON,
    "sample_prompts.json": SAMPLE_PROMPTS_JSON,
    "sample_prompts.txt": "",  # EveryDream2 ships it empty: samples then use training captions
    "validation_default.json": VALIDATION_DEFAULT_JSON,
    "cfgs/train_coco.json": TRAIN_COCO_JSON,
    "cfgs/validation_coco.json": VALIDATION_COCO_JSON,
}


@pytest.fixture(scope="module")
def ed2_checkout(tmp_path_factory):
    """A folder laid out like an EveryDream2 checkout with its shipped files and a tiny dataset."""
    root = tmp_path_factory.mktemp("ed2")
    for name, content in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    data = copy_images(root / "input", 8)
    copy_images(root / "val2017", 3)  # validation_coco.json's manual set, pointed at local data
    coco_val = {**VALIDATION_COCO_JSON, "val_data_root": str(root / "val2017")}
    (root / "cfgs" / "validation_coco.json").write_text(json.dumps(coco_val, indent=2))
    # Bounded for a CPU test: 1 denoising step instead of 15, and the 640x384 sample at 1/8 of
    # its size (80x48, the same aspect): everything else as shipped.
    samples = json.loads(json.dumps(SAMPLE_PROMPTS_JSON))
    samples["num_inference_steps"], samples["samples"][2]["size"] = 1, [80, 48]
    (root / "sample_prompts.json").write_text(json.dumps(samples, indent=2))
    return root, data


def run_ed2(root, config: str, *cli: str):
    """`python train.py --config <config> ...` as run from the EveryDream2 checkout, in process."""
    from trainer.config import load_config
    from trainer.run.loop import train
    from trainer.run.session import build_session

    pointed = ["--resolution", "64", "--stop_at_step", "1", "--num_workers", "0", *cli]
    session = build_session(load_config(config, pointed))
    try:
        return train(session), session
    finally:
        session.close()


def test_everydream2_files_load_train_chain_and_sample_unchanged(ed2_checkout, monkeypatch, caplog):
    root, data = ed2_checkout
    monkeypatch.chdir(root)
    sd1 = ("--data_root", data, "--resume_ckpt", "builtin:tiny-sd1")
    caplog.set_level(logging.WARNING)
    used, real = [], sampling.make_sample_scheduler
    monkeypatch.setattr(
        sampling, "make_sample_scheduler", lambda *a, **k: used.append(real(*a, **k)) or used[-1]
    )

    # train.json + optimizer.json + validation_default.json; samples from sample_prompts.json (dpm++)
    summary, s = run_ed2(
        root, "train.json", *sd1, "--sample_prompts", "sample_prompts.json", "--sample_steps", "1"
    )
    assert summary.global_step == 1 and s.cfg.seed != -1 and s.opt_file.base.optimizer == "adamw8bit"
    assert s.observers.validator is not None and s.observers.validator.enabled
    assert used and {(type(x).__name__, x.config.algorithm_type) for x in used} == {
        ("DPMSolverMultistepScheduler", "dpmsolver++")
    }
    pngs = sorted(p.name for p in s.run.samples.glob("*.png"))
    # no pretrain samples (not asked for); 3 samples: 2 cfgs each, the third its own cfgs [1, 11]
    assert [n.split("-")[:3] for n in pngs] == [["gs000001", "live", f"{i:02d}"] for i in range(6)]
    assert [(j.index, j.cfg) for j in s.observers.sampler.jobs] == [
        (0, 7),
        (0, 4),
        (1, 7),
        (1, 4),
        (2, 1),
        (2, 11),
    ]
    assert {_size(s.run.samples / n) for n in pngs} == {(64, 64), (80, 48)}

    # trainSD21.json + optimizerSD21.json on an SD2 model: train lr 2e-6 leaves the TE's 3e-7 alone
    summary, s = run_ed2(root, "trainSD21.json", "--data_root", data, "--resume_ckpt", "builtin:tiny-sd2")
    assert summary.global_step == 1 and s.model.family.startswith("sd2")
    assert s.optim.resolved_config()["text_encoder"]["lr"] == 3e-7

    # cfgs/train_coco.json + cfgs/validation_coco.json ("validate_training": "true"); wandb is
    # not installed here, so it is switched off on the command line
    summary, s = run_ed2(root, "cfgs/train_coco.json", *sd1, "--wandb", "false")
    assert summary.global_step == 1 and s.observers.validator.enabled and s.data.stabilize_items

    # the chain: chain0 from a base model, chain1 (+ optimizer_dadapt.json) and chain2 findlast
    first, s0 = run_ed2(root, "chain0.json", *sd1)
    second, s1 = run_ed2(
        root, "chain1.json", "--data_root", data, "--optimizer_config", "optimizer_dadapt.json"
    )
    third, s2 = run_ed2(root, "chain2.json", "--data_root", data)
    assert (s1.plan.mode, s1.plan.checkpoint.path) == (WEIGHTS, first.checkpoints[-1])
    assert (s2.plan.mode, s2.plan.checkpoint.path) == (WEIGHTS, second.checkpoints[-1])
    assert s1.opt_file.base.optimizer == "dadapt_adam" and "text_encoder" not in s2.optim.components
    assert third.global_step == 1 and len({s0.run.path, s1.run.path, s2.run.path}) == 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.size


# Argument names of EveryDream2's train.py (5098db8) plus the dead keys its shipped files carry.
ED2_TRAIN_KEYS = [
    "amp",
    "attn_type",
    "batch_size",
    "ckpt_every_n_minutes",
    "clip_grad_norm",
    "clip_skip",
    "cond_dropout",
    "data_root",
    "disable_amp",
    "disable_textenc_training",
    "disable_unet_training",
    "embedding_perturbation",
    "flip_p",
    "gpuid",
    "gradient_checkpointing",
    "grad_accum",
    "logdir",
    "log_step",
    "loss_type",
    "lr",
    "lr_decay_steps",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_epochs",
    "no_prepend_last",
    "no_save_ckpt",
    "optimizer_config",
    "plugins",
    "project_name",
    "resolution",
    "resume_ckpt",
    "run_name",
    "sample_prompts",
    "sample_steps",
    "save_ckpt_dir",
    "save_every_n_epochs",
    "save_ckpts_from_n_epochs",
    "save_full_precision",
    "save_optimizer",
    "seed",
    "shuffle_tags",
    "timestep_start",
    "timestep_end",
    "train_sampler",
    "keep_tags",
    "wandb",
    "validation_config",
    "write_schedule",
    "rated_dataset",
    "rated_dataset_target_dropout_percent",
    "zero_frequency_noise_ratio",
    "enable_zero_terminal_snr",
    "load_settings_every_epoch",
    "min_snr_gamma",
    "ema_decay_rate",
    "ema_strength_target",
    "ema_update_interval",
    "ema_device",
    "ema_sample_nonema_model",
    "ema_sample_ema_model",
    "ema_resume_model",
    "pyramid_noise_discount",
    "notebook",
    "lowvram",
    "disable_xformers",
    "scale_lr",
    "useadam8bit",
    "ed1_mode",
]
ED2_SAMPLE_KEYS = [
    "batch_size",
    "seed",
    "cfgs",
    "scheduler",
    "num_inference_steps",
    "show_progress_bars",
    "generate_pretrain_samples",
    "generate_samples_every_n_steps",
    "resolution",
    "prompt",
    "negative_prompt",
    "size",
    "aspect_ratio",
    "random_caption",
]


def test_every_everydream2_key_is_accepted_and_documented():
    from tests.helpers import ROOT
    from trainer.config import FIELDS, IGNORED_KEYS
    from trainer.data.validation_split import ValidationConfig

    config_doc = (ROOT / "docs" / "CONFIG.md").read_text()
    ed2_section = config_doc[config_doc.index("## Every EveryDream2 key and what it does here") :]
    assert [k for k in ED2_TRAIN_KEYS if k not in FIELDS and k not in IGNORED_KEYS] == []
    assert [k for k in ED2_TRAIN_KEYS if f"`{k}`" not in ed2_section] == []
    logging_doc = (ROOT / "docs" / "LOGGING.md").read_text()
    assert [
        k for k in ED2_SAMPLE_KEYS if f"`{k}`" not in logging_doc and f"`samples[].{k}`" not in logging_doc
    ] == []
    data_doc = (ROOT / "docs" / "DATA.md").read_text()
    shipped = {*VALIDATION_DEFAULT_JSON, *VALIDATION_COCO_JSON}
    assert shipped <= {*ValidationConfig.model_fields, "val_split_proportion", "val_data_root"}
    assert [k for k in shipped if f"`{k}`" not in data_doc] == []
