"""kohya_ss GUI JSON / sd-scripts TOML import: every mapped key, LR and warmup rules, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.importing.command import main
from trainer.importing.convert import convert_file, convert_values, root_key
from trainer.importing.rows import NOT_SUPPORTED, UNKNOWN
from trainer.importing.writer import optimizer_document, train_document, validate
from trainer.runtime.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "kohya"
SEED = FIXTURES / "gui_sdxl_lora.json"


def convert(kind: str, values: dict, **kw):
    """Convert, then run both documents through the trainer's own loaders."""
    base = {"max_train_epochs": 1} if kind == "toml" else {"epoch": 1}
    result = convert_values("cfg", kind, {**base, **values}, **kw)
    validate(train_document(result, Path("optimizer.json")), optimizer_document(result, "cfg"), "cfg")
    return result


def target(result, where: str):
    """'train:key', 'base:key' or 'te:key' -> the converted value ('<unset>' if absent)."""
    place, key = where.split(":")
    doc = {"train": result.train, "base": result.base, "te": result.text_encoder}[place]
    return doc.get(key, "<unset>")


# (source format, source keys, target, expected value): value in -> value out, one row per rule.
MAPPED = [
    ("gui", {"pretrained_model_name_or_path": "m.safetensors"}, "train:resume_ckpt", "m.safetensors"),
    ("toml", {"vae": "vae.safetensors"}, "train:vae", "vae.safetensors"),
    ("toml", {"v_parameterization": True}, "train:prediction_type", "v_prediction"),
    ("toml", {}, "train:prediction_type", "epsilon"),
    ("gui", {"max_resolution": "768,768"}, "train:resolution", 768),
    ("toml", {"resolution": "768,512"}, "train:resolution", 640),
    ("toml", {"resolution": [512, 512]}, "train:resolution", 512),
    ("toml", {"train_data_dir": "imgs"}, "train:data_root", "imgs"),
    ("toml", {"train_batch_size": 6}, "train:batch_size", 6),
    ("toml", {}, "train:batch_size", 1),
    ("toml", {"max_data_loader_n_workers": 3}, "train:num_workers", 3),
    ("toml", {"cache_latents": True}, "train:cache_latents", True),
    ("toml", {"shuffle_caption": True}, "train:shuffle_tags", True),
    ("toml", {"keep_tokens": 1}, "train:keep_tags", 0),
    ("toml", {"keep_tokens": 4}, "train:keep_tags", 3),
    ("toml", {"caption_dropout_rate": 0.1}, "train:cond_dropout", 0.1),
    ("toml", {}, "train:cond_dropout", 0.0),
    ("toml", {"flip_aug": True}, "train:flip_p", 0.5),
    ("toml", {"noise_offset": 0.1}, "train:zero_frequency_noise_ratio", 0.1),
    ("toml", {}, "train:zero_frequency_noise_ratio", 0.0),
    ("gui", {"noise_offset": 0}, "train:zero_frequency_noise_ratio", 0.0),
    (
        "toml",
        {"noise_offset": 0.09, "noise_offset_random_strength": True},
        "train:zero_frequency_noise_ratio",
        0.09,
    ),
    (
        "toml",
        {"noise_offset": 0.09, "noise_offset_random_strength": True},
        "train:noise_offset_random_strength",
        True,
    ),
    ("toml", {"noise_offset_random_strength": True}, "train:noise_offset_random_strength", "<unset>"),
    (
        "toml",
        {"multires_noise_iterations": 8, "multires_noise_discount": 0.4},
        "train:pyramid_noise_discount",
        0.4,
    ),
    ("toml", {"multires_noise_iterations": 8}, "train:multires_noise_iterations", 8),
    ("toml", {"multires_noise_iterations": 8}, "train:pyramid_noise_discount", 0.3),
    ("toml", {"masked_loss": True}, "train:masked_loss", True),
    ("toml", {"masked_loss": True}, "train:unmasked_weight", 0.0),
    ("toml", {"alpha_mask": True}, "train:masked_loss", True),
    ("toml", {"alpha_mask": True}, "train:mask_from_alpha", True),
    ("toml", {"masked_loss": False}, "train:masked_loss", "<unset>"),
    ("toml", {"debiased_estimation_loss": True}, "train:debiased_estimation_loss", True),
    ("toml", {"ip_noise_gamma": 0.1}, "train:ip_noise_gamma", 0.1),
    (
        "toml",
        {"ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True},
        "train:ip_noise_gamma_random_strength",
        True,
    ),
    ("gui", {"ip_noise_gamma": 0}, "train:ip_noise_gamma", "<unset>"),
    ("toml", {"caption_dropout_every_n_epochs": 3}, "train:caption_dropout_every_n_epochs", 3),
    ("toml", {"keep_tokens_separator": "|||"}, "train:keep_tokens_separator", "|||"),
    ("toml", {"stop_text_encoder_training": 400}, "train:stop_text_encoder_training", 400),
    ("gui", {"stop_text_encoder_training": 0}, "train:stop_text_encoder_training", "<unset>"),
    ("toml", {"stop_text_encoder_training": -1}, "train:disable_textenc_training", True),
    ("gui", {"stop_text_encoder_training_pct": 25}, "train:stop_text_encoder_training", 0.25),
    (
        "toml",
        {"train_text_encoder": False, "stop_text_encoder_training": 10},
        "train:stop_text_encoder_training",
        "<unset>",
    ),
    ("toml", {"save_every_n_steps": 500}, "train:save_every_n_steps", 500),
    ("gui", {"save_every_n_steps": 0}, "train:save_every_n_steps", "<unset>"),
    ("toml", {"multires_noise_discount": 0.4}, "train:pyramid_noise_discount", "<unset>"),
    ("toml", {"min_snr_gamma": 5}, "train:min_snr_gamma", 5.0),
    ("gui", {"min_snr_gamma": 0}, "train:min_snr_gamma", None),
    ("toml", {"zero_terminal_snr": True}, "train:enable_zero_terminal_snr", True),
    ("toml", {"min_timestep": 100}, "train:timestep_start", 100),
    ("toml", {"max_timestep": 800}, "train:timestep_end", 800),
    ("toml", {"loss_type": "l2"}, "train:loss_type", "mse"),
    ("toml", {"loss_type": "huber"}, "train:loss_type", "huber"),
    ("toml", {"mixed_precision": "fp16"}, "train:mixed_precision", "fp16"),
    ("toml", {"mixed_precision": "fp8"}, "train:mixed_precision", "<unset>"),
    ("toml", {}, "train:mixed_precision", "no"),
    ("toml", {"full_bf16": True, "mixed_precision": "bf16"}, "train:weight_dtype", "bf16"),
    ("toml", {"gradient_checkpointing": True}, "train:gradient_checkpointing", True),
    ("toml", {"gradient_accumulation_steps": 4}, "train:grad_accum", 4),
    ("gui", {"xformers": "sdpa"}, "train:attn_type", "sdp"),
    ("toml", {"torch_compile": True, "dynamo_backend": "inductor"}, "train:compile", True),
    ("gui", {"dynamo_backend": "aot_eager"}, "train:compile_backend", "aot_eager"),
    ("gui", {"dynamo_backend": "tensorrt"}, "train:compile", "<unset>"),
    (
        "gui",
        {"dynamo_backend": "inductor", "dynamo_mode": "max-autotune"},
        "train:compile_mode",
        "max-autotune",
    ),
    ("gui", {"dynamo_backend": "no", "dynamo_mode": "max-autotune"}, "train:compile_mode", "<unset>"),
    ("toml", {"output_dir": "out"}, "train:logdir", "out"),
    ("toml", {"output_name": "mymodel"}, "train:project_name", "mymodel"),
    ("toml", {"save_every_n_epochs": 2}, "train:save_every_n_epochs", 2),
    ("gui", {"save_every_n_epochs": 0}, "train:save_every_n_epochs", None),
    ("toml", {"save_last_n_epochs": 3}, "train:keep_last_checkpoints", 3),
    ("toml", {"save_state": True}, "train:save_optimizer", True),
    ("toml", {}, "train:save_optimizer", False),
    ("toml", {"save_model_as": "diffusers"}, "train:no_save_ckpt", True),
    ("toml", {"save_model_as": "safetensors"}, "train:no_save_ckpt", False),
    ("toml", {"save_precision": "float"}, "train:save_precision", "fp32"),
    ("toml", {"save_precision": "fp16"}, "train:save_precision", "fp16"),
    ("toml", {"save_precision": "bf16"}, "train:save_precision", "bf16"),
    ("toml", {}, "train:sample_prompts", None),
    ("toml", {"sample_every_n_steps": 150}, "train:sample_steps", 150),
    ("toml", {"sample_at_first": True}, "train:sample_at_start", True),
    ("toml", {}, "train:sample_at_start", False),
    ("toml", {"seed": 7}, "train:seed", 7),
    ("toml", {}, "train:seed", -1),
    ("gui", {"seed": 0}, "train:seed", -1),
    ("toml", {"clip_skip": 2}, "train:clip_skip", 2),
    ("gui", {"clip_skip": 0}, "train:clip_skip", 0),
    ("toml", {"max_token_length": 150}, "train:max_token_length", 150),
    ("toml", {"log_with": "wandb"}, "train:wandb", True),
    ("toml", {"log_with": "tensorboard"}, "train:wandb", False),
    ("toml", {"wandb_run_name": "r1"}, "train:run_name", "r1"),
    ("toml", {"max_train_epochs": 7}, "train:max_epochs", 7),
    ("gui", {"epoch": 12}, "train:max_epochs", 12),
    ("gui", {"epoch": 12, "max_train_epochs": 3}, "train:max_epochs", 3),
    ("toml", {"max_grad_norm": 2.0}, "train:clip_grad_norm", 2.0),
    ("toml", {"max_grad_norm": 0}, "train:clip_grad_norm", None),
    ("toml", {}, "train:clip_grad_norm", 1.0),
    ("toml", {"train_text_encoder": False}, "train:disable_textenc_training", True),
    # optimizer names and their arguments
    ("toml", {}, "base:optimizer", "adamw"),
    ("toml", {"optimizer_type": "AdamW8bit"}, "base:optimizer", "adamw8bit"),
    ("toml", {"optimizer_type": "PagedAdamW32bit"}, "base:optimizer", "paged_adamw"),
    ("toml", {"optimizer_type": "Lion"}, "base:optimizer", "lion"),
    ("toml", {"optimizer_type": "PagedLion8bit"}, "base:optimizer", "paged_lion8bit"),
    ("toml", {"optimizer_type": "DAdaptAdam"}, "base:optimizer", "dadapt_adam"),
    ("toml", {"optimizer_type": "Prodigy"}, "base:optimizer", "prodigy"),
    ("toml", {"optimizer_type": "torch.optim.RMSprop"}, "base:optimizer", "rmsprop"),
    ("toml", {"optimizer_type": "SGDNesterov"}, "base:nesterov", True),
    ("toml", {"optimizer_type": "SGDNesterov"}, "base:momentum", 0.9),
    ("toml", {"use_8bit_adam": True}, "base:optimizer", "adamw8bit"),
    ("toml", {"use_lion_optimizer": True}, "base:optimizer", "lion"),
    ("toml", {"optimizer_type": "DAdaptAdanIP"}, "base:optimizer", "adamw"),
    ("toml", {"optimizer_args": ["weight_decay=0.1"]}, "base:weight_decay", 0.1),
    ("toml", {"optimizer_args": ["eps=1e-6"]}, "base:epsilon", 1e-6),
    ("gui", {"optimizer_args": "betas=0.9,0.95 weight_decay=1"}, "base:betas", [0.9, 0.95]),
    ("gui", {"optimizer_args": "betas=0.9,0.95 weight_decay=1"}, "base:weight_decay", 1.0),
    (
        "toml",
        {"optimizer_type": "Prodigy", "optimizer_args": ["d_coef=2", "safeguard_warmup=True"]},
        "base:d_coef",
        2.0,
    ),
    ("toml", {"optimizer_type": "Adafactor"}, "base:lr_scheduler", "adafactor"),
    ("toml", {"optimizer_type": "Adafactor"}, "base:lr", "<unset>"),
    (
        "toml",
        {"optimizer_type": "Adafactor", "optimizer_args": ["relative_step=False"], "learning_rate": 1e-5},
        "base:lr",
        1e-5,
    ),
    # schedulers
    (
        "toml",
        {"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 3},
        "base:lr_scheduler_num_cycles",
        3,
    ),
    ("toml", {"lr_scheduler": "polynomial", "lr_scheduler_power": 2}, "base:lr_scheduler_power", 2.0),
    ("toml", {"lr_scheduler": "cosine"}, "base:lr_scheduler", "cosine"),
    ("toml", {"lr_scheduler": "inverse_sqrt"}, "base:lr_scheduler", "<unset>"),
    (
        "toml",
        {"lr_scheduler": "constant", "lr_warmup_steps": 10},
        "base:lr_scheduler",
        "constant_with_warmup",
    ),
]


@pytest.mark.parametrize(("kind", "values", "where", "expected"), MAPPED)
def test_every_mapped_key(kind, values, where, expected):
    assert target(convert(kind, values), where) == expected


@pytest.mark.parametrize(
    ("kind", "values", "unet", "te"),
    [
        ("toml", {"learning_rate": 1e-5}, 1e-5, 1e-5),
        ("toml", {}, 2e-6, 2e-6),  # sd-scripts' default learning_rate
        ("toml", {"learning_rate": 1e-5, "learning_rate_te": 3e-6}, 1e-5, 3e-6),
        ("toml", {"learning_rate": 1e-5, "unet_lr": 4e-5, "text_encoder_lr": 2e-6}, 4e-5, 2e-6),
        ("toml", {"learning_rate": 1e-5, "text_encoder_lr": [2e-6, 1e-6]}, 1e-5, 2e-6),
        ("gui", {"learning_rate": 1e-5, "unet_lr": 0, "text_encoder_lr": 0}, 1e-5, 1e-5),  # GUI 0 = unset
    ],
)
def test_learning_rate_per_component(kind, values, unet, te):
    result = convert(kind, values)
    assert (result.base["lr"], result.text_encoder["lr"]) == (unet, te)


@pytest.mark.parametrize(
    ("kind", "values", "flag"),
    [
        ("toml", {"text_encoder_lr": 0}, "disable_textenc_training"),
        ("toml", {"learning_rate_te": 0.0}, "disable_textenc_training"),
        ("toml", {"unet_lr": 0}, "disable_unet_training"),
        ("gui", {"learning_rate": 1e-5, "unet_lr": 1e-5, "text_encoder_lr": 0}, "disable_textenc_training"),
    ],
)
def test_zero_learning_rate_freezes_the_component(kind, values, flag):
    result = convert(kind, values)
    assert result.train[flag] is True
    assert "lr" not in (result.text_encoder if flag == "disable_textenc_training" else result.base)


@pytest.mark.parametrize(
    ("kind", "values", "spe", "warmup", "decay"),
    [
        ("toml", {"lr_warmup_steps": 50, "lr_scheduler": "cosine"}, None, 50, "<unset>"),
        ("toml", {"lr_warmup_steps": 0.1, "lr_scheduler": "cosine", "max_train_epochs": 4}, 30, 12, 120),
        (
            "toml",
            {
                "lr_warmup_steps": 0.25,
                "lr_scheduler": "linear",
                "max_train_epochs": None,
                "max_train_steps": 1000,
            },
            300,
            250,
            1000,
        ),
        ("gui", {"lr_warmup": 5, "lr_scheduler": "cosine", "epoch": 4}, 50, 10, 200),  # GUI: percent
        ("gui", {"lr_warmup": 5, "lr_warmup_steps": 7, "lr_scheduler": "linear", "epoch": 4}, 50, 7, 200),
        ("toml", {"lr_scheduler": "constant_with_warmup"}, None, 0, "<unset>"),
    ],
)
def test_warmup_and_decay_conversion(kind, values, spe, warmup, decay):
    result = convert(kind, values, steps_per_epoch=spe)
    assert (result.base["lr_warmup_steps"], result.base.get("lr_decay_steps", "<unset>")) == (warmup, decay)


def test_step_count_becomes_epochs_with_steps_per_epoch():
    result = convert("toml", {"max_train_epochs": None, "max_train_steps": 1000}, steps_per_epoch=300)
    assert result.train["max_epochs"] == 4


@pytest.mark.parametrize(
    "values",
    [{"lr_warmup_steps": 0.1}, {"max_train_epochs": None, "max_train_steps": 500}],
)
def test_a_fraction_or_step_count_without_steps_per_epoch_is_a_clear_error(values):
    with pytest.raises(ConfigError, match="--steps_per_epoch"):
        convert("toml", values)


def test_unknown_key_is_named_in_the_table_with_a_suggestion():
    result = convert("toml", {"learnig_rate": 1e-4, "noise_offset": 0.05})
    (row,) = [r for r in result.rows if r.source == "learnig_rate"]
    assert row.status == UNKNOWN and "did you mean 'learning_rate'" in row.note
    assert row in result.lossy_rows()


def test_not_supported_feature_is_reported_but_off_values_are_not_lossy():
    result = convert("toml", {"color_aug": True, "adaptive_noise_scale": 0.0})
    rows = {r.source: r for r in result.rows}
    assert rows["color_aug"].status == NOT_SUPPORTED
    assert rows["adaptive_noise_scale"] not in result.lossy_rows()
    result = convert("toml", {"ip_noise_gamma": 0.1, "color_aug": False})
    rows = {r.source: r for r in result.rows}
    assert rows["ip_noise_gamma"].status == "mapped"
    assert rows["color_aug"] not in result.lossy_rows()


@pytest.mark.parametrize(
    ("text", "expected", "status"),
    [
        ("a red circle\na blue square\n", "FILE", "mapped"),
        ("a red circle --n blurry --w 512 --s 20\n", None, NOT_SUPPORTED),  # kohya's per-line options
    ],
)
def test_sample_prompt_file(tmp_path, text, expected, status):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    result = convert("toml", {"sample_prompts": str(prompts)})
    assert result.train["sample_prompts"] == (str(prompts) if expected == "FILE" else None)
    assert [r.status for r in result.rows if r.source == "sample_prompts"] == [status]


@pytest.mark.parametrize(("ext", "status"), [(".txt", "off"), (".caption", "off"), (".tags", NOT_SUPPORTED)])
def test_caption_extension(ext, status):
    result = convert("toml", {"caption_extension": ext})
    assert [r.status for r in result.rows if r.source == "caption_extension"] == [status]


def test_dataset_config_named_inside_a_gui_file_is_read(tmp_path):
    (tmp_path / "imgs").mkdir()
    ds = tmp_path / "ds.toml"
    ds.write_text(
        f"[[datasets]]\nresolution = 768\n  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'imgs'}'\n"
    )
    result = convert(
        "gui", {"dataset_config": str(ds), "max_resolution": "512,512", "train_data_dir": "elsewhere"}
    )
    assert (result.train["resolution"], result.train["data_root"]) == (768, str(tmp_path / "imgs"))


def test_secret_values_never_reach_the_table():
    result = convert("gui", {"wandb_api_key": "abc123"})
    assert "abc123" not in json.dumps([r.value for r in result.rows])


@pytest.mark.parametrize(("kind", "value"), [("toml", True), ("gui", "xformers")])
def test_xformers_is_kept_where_it_is_installed(monkeypatch, kind, value):
    import trainer.importing.map_options as map_options

    monkeypatch.setattr(map_options, "xformers_installed", lambda: True)
    result = convert(kind, {"xformers": value})
    assert result.train["attn_type"] == "xformers"


@pytest.mark.parametrize(("kind", "value"), [("toml", True), ("gui", "xformers")])
def test_xformers_becomes_sdp_where_it_is_not_installed_and_the_row_says_so(monkeypatch, kind, value):
    import trainer.importing.map_options as map_options

    monkeypatch.setattr(map_options, "xformers_installed", lambda: False)
    result = convert(kind, {"xformers": value})
    assert result.train["attn_type"] == "sdp"
    (row,) = [r for r in result.rows if r.source == "xformers"]
    assert row.target == "train.json attn_type = sdp"
    assert "xformers is not installed here" in row.note and "memory-efficient" in row.note


def test_seed_configuration_imports_every_key():
    result = convert_file(SEED, steps_per_epoch=25)
    source = json.loads(SEED.read_text())
    assert set(source) <= {root_key(r.source) for r in result.rows}
    (sdxl,) = [r for r in result.rows if r.source == "sdxl"]
    assert sdxl.status == NOT_SUPPORTED and "SD1.x and SD2.x" in sdxl.note and "resume_ckpt" in sdxl.note
    assert [r.source for r in result.lossy_rows()] == ["sdxl", "(LoRA learning rates)"]
    assert result.base == {
        "optimizer": "adamw8bit",
        "weight_decay": 0.02,
        "betas": [0.9, 0.99],
        "lr": 0.00015,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 25,  # 10 % of 10 epochs x 25 steps
        "lr_decay_steps": 250,
    }
    assert result.text_encoder == {"lr": 5e-05}
    assert result.train["zero_frequency_noise_ratio"] == 0.06 and result.train["noise_offset_random_strength"]
    assert result.train["keep_tags"] == 2 and result.train["max_epochs"] == 10


def test_migrating_doc_shows_the_tool_output_for_the_seed_configuration():
    from trainer.importing.rows import table_markdown

    doc = (Path(__file__).parent.parent / "docs" / "MIGRATING.md").read_text()
    assert table_markdown(convert_file(SEED, steps_per_epoch=25).rows) in doc


def test_malformed_json_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "learning_rate": 1e-4,\n  "epoch": ,\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 3"):
        convert_file(bad)
    assert main([str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "bad.json" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_malformed_toml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training_arguments]\nlearning_rate = 1e-4\nseed = = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: .*line 3"):
        convert_file(bad)


def test_dataset_config_limits_are_reported(tmp_path):
    ds = tmp_path / "ds.toml"
    ds.write_text(
        "[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = 'a'\n"
        "  [[datasets.subsets]]\n  image_dir = 'reg'\n  is_reg = true\n"
        "[[datasets]]\nresolution = 768\n  [[datasets.subsets]]\n  image_dir = 'b'\n"
    )
    result = convert("toml", {}, dataset_config=ds)
    assert (result.train["resolution"], result.train["data_root"]) == (512, ["a", "b"])
    lossy = {r.source for r in result.lossy_rows()}
    assert lossy == {"datasets[1].resolution", "datasets[0].subsets[1].is_reg"}


def test_a_key_set_in_two_toml_sections_is_an_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[a]\nseed = 1\n[b]\nseed = 2\n")
    with pytest.raises(ConfigError, match=r"c\.toml: key 'seed' is set twice"):
        convert_file(cfg)
