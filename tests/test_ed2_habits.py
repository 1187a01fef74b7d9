"""EveryDream2 habits that must work unchanged (issue 14): tolerant reading with loud warnings,
sample-JSON keys and schedulers, precedence warnings, save cadence. Fast unit tests; the runs
that train are in test_chaining.py and test_everydream2_files.py."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from trainer.checkpointing import SavePolicy
from trainer.config import build_config, parse_cli_overrides
from trainer.data.validation_split import load_validation_config
from trainer.eval.sampling import (
    SCHEDULERS,
    SampleJob,
    _batches,
    concrete_prompt_and_seed,
    load_sample_jobs,
    make_sample_scheduler,
    pretrain_samples_wanted,
)
from trainer.models.components import training_scheduler_config
from trainer.optim import TrainOptimSettings, parse_optimizer_json, resolve_components
from trainer.runtime.errors import ConfigError

# ---- item 3: tolerant reading ------------------------------------------------------------------


def test_a_number_given_to_a_text_key_on_the_command_line_is_that_text():
    values = parse_cli_overrides(
        ["--project_name", "2024", "--data_root", "2024", "--run_name", "42", "--lr", "2e-6"]
    )
    assert values == {"project_name": "2024", "data_root": "2024", "run_name": "42", "lr": 2e-6}
    cfg = build_config({}, values, source="test")
    assert (cfg.project_name, cfg.data_root, cfg.run_name, cfg.lr) == ("2024", "2024", "42", 2e-6)
    # a JSON list is still a list for data_root, and null still null for an optional text key
    assert parse_cli_overrides(["--data_root", '["a", "b"]', "--vae", "null"]) == {
        "data_root": ["a", "b"],
        "vae": None,
    }


def test_validate_training_given_as_a_string_is_read_with_a_warning(tmp_path, caplog):
    path = tmp_path / "validation_coco.json"
    path.write_text(
        json.dumps({"validate_training": "true", "val_split_mode": "manual", "val_data_root": "v"})
    )
    with caplog.at_level(logging.WARNING):
        cfg = load_validation_config(path)
    assert cfg.validate_training is True and cfg.manual_data_root == "v"
    assert any("'validate_training' is the string 'true'" in r.message for r in caplog.records)
    path.write_text(json.dumps({"validate_training": "yes"}))
    with pytest.raises(ConfigError, match="validate_training"):
        load_validation_config(path)


def test_per_sample_cfgs_are_accepted_and_used_with_a_warning(tmp_path, caplog):
    path = tmp_path / "sample_prompts.json"
    path.write_text(
        json.dumps({"cfgs": [7, 4], "samples": [{"prompt": "a"}, {"prompt": "b", "cfgs": [1, 11]}]})
    )
    with caplog.at_level(logging.WARNING):
        jobs, _ = load_sample_jobs(path, resolution=64, default_seed=1, fallback_captions=[])
    assert [(j.prompt, j.cfg) for j in jobs] == [("a", 7.0), ("a", 4.0), ("b", 1.0), ("b", 11.0)]
    assert any("samples[1] has its own cfgs [1, 11]" in r.message for r in caplog.records)


# ---- item 4: samples as EveryDream2 makes them --------------------------------------------------

SD_SCHEDULER = training_scheduler_config(
    {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
)


def test_unknown_sample_scheduler_is_an_error_naming_the_choices(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"scheduler": "dpm+", "samples": [{"prompt": "x"}]}))
    with pytest.raises(ConfigError, match=r"scheduler: unknown scheduler 'dpm\+'; choose one of ddim, ddpm"):
        load_sample_jobs(path, resolution=64, default_seed=1, fallback_captions=[])


@pytest.mark.parametrize(
    ("name", "cls", "options"),
    [
        ("ddim", "DDIMScheduler", {}),
        ("pndm", "PNDMScheduler", {}),
        ("lms", "LMSDiscreteScheduler", {}),
        ("euler", "EulerDiscreteScheduler", {}),
        ("euler_a", "EulerAncestralDiscreteScheduler", {}),
        (
            "dpm++",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False},
        ),
        ("dpm++_2m_k", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        ("dpm++_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        ("dpm++_2s", "DPMSolverSinglestepScheduler", {}),
        ("kdpm2", "KDPM2AncestralDiscreteScheduler", {}),
    ],
)
def test_sample_schedulers_are_the_diffusers_ones_everydream2_uses(name, cls, options):
    sched = make_sample_scheduler(SD_SCHEDULER, name, zero_terminal_snr=False)
    assert type(sched).__name__ == cls
    assert {k: sched.config[k] for k in options} == options
    assert sched.config.num_train_timesteps == 1000


def test_zero_terminal_snr_refuses_a_scheduler_without_it():
    cfg = SD_SCHEDULER
    assert make_sample_scheduler(cfg, "euler", zero_terminal_snr=True).config.rescale_betas_zero_snr
    with pytest.raises(ConfigError, match="'pndm' cannot sample a zero-terminal-SNR model"):
        make_sample_scheduler(cfg, "pndm", zero_terminal_snr=True)
    assert "pndm" in SCHEDULERS


def test_pretrain_samples_are_opt_in_and_never_with_a_txt(tmp_path):
    json_path = tmp_path / "s.json"
    json_path.write_text(json.dumps({"samples": [{"prompt": "x"}]}))
    _, spec = load_sample_jobs(json_path, resolution=64, default_seed=1, fallback_captions=[])
    assert pretrain_samples_wanted(None, str(json_path), spec) is False
    json_path.write_text(json.dumps({"generate_pretrain_samples": True, "samples": [{"prompt": "x"}]}))
    _, spec = load_sample_jobs(json_path, resolution=64, default_seed=1, fallback_captions=[])
    assert pretrain_samples_wanted(None, str(json_path), spec) is True
    txt = tmp_path / "s.txt"
    txt.write_text("a prompt\n")
    _, spec = load_sample_jobs(txt, resolution=64, default_seed=1, fallback_captions=[])
    assert pretrain_samples_wanted(None, str(txt), spec) is False
    assert pretrain_samples_wanted(True, str(txt), spec) is True  # train.json's sample_at_start wins


def test_sample_json_keys_as_documented_in_everydream2_logging_md(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            {
                "batch_size": 2,
                "seed": 100,
                "cfgs": [7],
                "num_inference_steps": 15,
                "generate_samples_every_n_steps": 200,
                "samples": [
                    {"prompt": "a", "negative_prompt": "distorted, deformed"},
                    {"prompt": "b", "seed": -1, "aspect_ratio": 1.77778},
                    {"random_caption": True, "size": [640, 384]},
                ],
            }
        )
    )
    jobs, spec = load_sample_jobs(
        path, resolution=512, default_seed=1, fallback_captions=["cap one", "cap two"]
    )
    assert [(j.prompt, j.negative_prompt, j.seed, j.width, j.height, j.steps) for j in jobs] == [
        ("a", "distorted, deformed", 100, 512, 512, 15),
        ("b", "", -1, 704, 384, 15),
        ("", "", 102, 640, 384, 15),
    ]
    assert jobs[2].random_caption and not jobs[0].random_caption
    from trainer.eval.sampling import SampleGenerator

    gen = SampleGenerator(jobs, tmp_path, variants=["live"], zero_terminal_snr=False, spec=spec)
    assert gen.every_n_steps(250) == 200


def test_seed_minus_one_and_random_caption_change_each_sampling_point():
    job = SampleJob("", "", -1, 64, 64, 7.0, 2, random_caption=True, index=1)
    captions = [f"caption {i}" for i in range(50)]
    at = {step: concrete_prompt_and_seed(job, step, captions) for step in (0, 100, 200)}
    assert len({seed for _, seed in at.values()}) == 3 and len({p for p, _ in at.values()}) > 1
    assert concrete_prompt_and_seed(job, 100, captions) == at[100]  # same point, same image (resume)
    fixed = SampleJob("a", "", 5, 64, 64, 7.0, 2)
    assert {concrete_prompt_and_seed(fixed, s, captions) for s in (0, 100)} == {("a", 5)}


def test_sample_batches_share_size_and_cfg_only():
    def job(w, cfg):
        return SampleJob("p", "", 1, w, 64, cfg, 2)

    jobs = list(enumerate([job(64, 7), job(128, 7), job(64, 7), job(64, 4), job(64, 7)]))
    groups = [[i for i, _ in b] for b in _batches(jobs, 2)]
    assert groups == [[0, 2], [4], [1], [3]]


# ---- item 5: precedence that surprises is a warning ---------------------------------------------


def _resolve(config, **settings):
    return resolve_components(
        parse_optimizer_json(json.dumps(config), "optimizer.json"), TrainOptimSettings(**settings), 100
    )


def test_train_lr_leaving_an_explicit_te_lr_alone_is_a_warning(caplog):
    with caplog.at_level(logging.INFO):
        r = _resolve({"base": {"lr": 1e-6}, "text_encoder_overrides": {"lr": 3e-7}}, lr=2e-6)
    assert (r["unet"].lr, r["text_encoder"].lr) == (2e-6, 3e-7)
    [record] = [r for r in caplog.records if "applies to the UNet only" in r.message]
    assert record.levelno == logging.WARNING and "text_encoder_overrides.lr 3e-07" in record.message


def test_cli_lr_scheduler_overridden_by_optimizer_json_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        r = _resolve({"base": {"lr": 1e-6, "lr_scheduler": "constant"}}, lr_scheduler="cosine")
    assert r["unet"].lr_scheduler == "constant"
    warned = [r.message for r in caplog.records if "train lr_scheduler 'cosine'" in r.message]
    assert len(warned) == 2 and "overridden by optimizer.json's 'constant'" in warned[0]
    caplog.clear()
    _resolve({"base": {"lr": 1e-6, "lr_scheduler": "constant"}}, lr_scheduler="constant")
    assert not [r for r in caplog.records if "lr_scheduler" in r.message]


# ---- item 7: save cadence -----------------------------------------------------------------------


def _policy(epochs, minutes):
    cfg = build_config({"save_every_n_epochs": epochs, "ckpt_every_n_minutes": minutes}, {}, source="t")
    return SavePolicy.from_config(SimpleNamespace(**{**cfg.model_dump(), "save_ckpts_from_n_epochs": 0}))


def test_save_cadence_zero_is_off_and_nothing_set_is_every_20_minutes():
    assert (_policy(None, None).every_n_epochs, _policy(None, None).every_n_minutes) == (None, 20)
    off = _policy(0, 0)
    assert (off.every_n_epochs, off.every_n_minutes) == (None, None)
    assert not off.epoch_end_due(0, 10) and not off.time_due()
    assert (_policy(5, None).every_n_epochs, _policy(5, None).every_n_minutes) == (5, None)
    assert (_policy(0, None).every_n_epochs, _policy(0, None).every_n_minutes) == (None, None)
    assert _policy(None, 0.5).every_n_minutes == 0.5


# ---- item 9: transparent pixels --------------------------------------------------------------


def test_colour_hidden_under_transparent_pixels_trains_as_white_as_documented(tmp_path):
    """EveryDream2 trains on the hidden colour (it drops alpha); this project paints it white."""
    from PIL import Image

    from tests.helpers import ROOT
    from trainer.data.transforms import load_image

    image = Image.new("RGBA", (8, 8), (200, 10, 10, 0))  # red, fully transparent
    image.putpixel((0, 0), (200, 10, 10, 255))
    image.save(tmp_path / "t.png")
    loaded = load_image(tmp_path / "t.png")
    assert loaded.getpixel((1, 1)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (200, 10, 10)
    assert image.convert("RGB").getpixel((1, 1)) == (200, 10, 10)  # what EveryDream2 trains on
    doc = (ROOT / "docs" / "DATA.md").read_text()
    assert "**composited on white**. This is a choice: EveryDream2's" in doc
