"""kohya import end to end: an sd-scripts TOML pair through the CLI, dataset folder files, and the
imported seed configuration training builtin:tiny-sd1 for a step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import base_args, copy_images
from trainer.importing.command import main
from trainer.runtime.errors import ConfigError

SEED = Path(__file__).parent / "fixtures" / "kohya" / "gui_sdxl_lora.json"

CONFIG_TOML = """\
[model_arguments]
pretrained_model_name_or_path = "models/sd15.safetensors"
v2 = false

[optimizer_arguments]
optimizer_type = "Lion"
learning_rate = 2e-7
learning_rate_te = 1e-7
optimizer_args = ["weight_decay=0.1", "betas=0.95,0.98"]
lr_scheduler = "cosine"
lr_warmup_steps = 0.1
max_grad_norm = 0.0

[training_arguments]
max_train_epochs = 3
train_batch_size = 8
mixed_precision = "bf16"
seed = 42
noise_offset = 0.05
output_name = "toml-run"
"""


def dataset_toml(people: Path, cats: Path) -> str:
    return f"""\
[general]
shuffle_caption = true
keep_tokens = 2
caption_extension = ".txt"

[[datasets]]
resolution = [512, 512]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{people}'
  num_repeats = 3
  class_tokens = "a person"

  [[datasets.subsets]]
  image_dir = '{cats}'
  flip_aug = true
"""


@pytest.fixture
def toml_pair(tmp_path):
    people, cats = tmp_path / "people", tmp_path / "cats"
    people.mkdir(), cats.mkdir()
    (tmp_path / "config.toml").write_text(CONFIG_TOML)
    (tmp_path / "dataset.toml").write_text(dataset_toml(people, cats))
    return tmp_path, people, cats


def run_import(tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    argv = [str(tmp_path / "config.toml"), "--dataset_config", str(tmp_path / "dataset.toml")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--steps_per_epoch", "20", *extra]) == 0
    train = json.loads((tmp_path / "out" / "train.json").read_text())
    optimizer = json.loads((tmp_path / "out" / "optimizer.json").read_text())
    return train, optimizer


def test_sd_scripts_toml_pair_imports(toml_pair, capsys):
    tmp_path, people, cats = toml_pair
    train, optimizer = run_import(tmp_path)
    assert optimizer["base"] == {
        "optimizer": "lion",
        "weight_decay": 0.1,
        "betas": [0.95, 0.98],
        "lr": 2e-7,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 6,  # int(0.1 x 3 epochs x 20 steps)
        "lr_decay_steps": 60,
    }
    assert optimizer["text_encoder_overrides"] == {"lr": 1e-7}
    expected = {
        "resume_ckpt": "models/sd15.safetensors",
        "max_epochs": 3,
        "batch_size": 2,  # the dataset config wins over train_batch_size, as in sd-scripts
        "resolution": 512,
        "shuffle_tags": True,
        "keep_tags": 1,
        "clip_grad_norm": None,
        "mixed_precision": "bf16",
        "seed": 42,
        "zero_frequency_noise_ratio": 0.05,
        "project_name": "toml-run",
        "data_root": [str(people), str(cats)],
        "flip_p": "<unset>",  # only the cats folder flips (flip_p.txt)
    }
    assert {k: train.get(k, "<unset>") for k in expected} == expected
    table = capsys.readouterr().out
    assert f"{people / 'multiply.txt'} = 3" in table and "not written: pass --write-dataset-settings" in table
    assert not list(people.iterdir()) and not list(cats.iterdir())  # nothing in the dataset changes unasked


def test_write_dataset_settings_writes_files_the_trainer_reads(toml_pair):
    from trainer.data.discovery import discover

    tmp_path, people, cats = toml_pair
    run_import(tmp_path, "--write-dataset-settings")
    assert (people / "multiply.txt").read_text() == "3\n"
    assert (people / "local.yaml").read_text() == 'main_prompt: "a person"\n'
    assert sorted(p.name for p in cats.iterdir()) == ["flip_p.txt"]
    copy_images(people, 1)
    copy_images(cats, 1)
    next(people.glob("*.png")).with_suffix(".txt").unlink()  # class tokens caption uncaptioned images
    items = {Path(i.path).parent.name: i for i in discover([str(people), str(cats)]).items}
    assert (items["people"].multiply, items["people"].caption.main_prompt) == (3.0, "a person")
    assert (items["cats"].multiply, items["cats"].flip_p) == (1.0, 0.5)


def test_write_dataset_settings_never_overwrites_a_different_file(toml_pair):
    tmp_path, people, _ = toml_pair
    (people / "multiply.txt").write_text("7\n")
    argv = [
        str(tmp_path / "config.toml"),
        "--dataset_config",
        str(tmp_path / "dataset.toml"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--steps_per_epoch", "20", "--write-dataset-settings"]) == 2
    assert (people / "multiply.txt").read_text() == "7\n"


def test_dreambooth_folder_repeats_become_multiply_txt(tmp_path):
    (tmp_path / "img" / "5_zwx dog").mkdir(parents=True)
    cfg = tmp_path / "gui.json"
    cfg.write_text(json.dumps({"train_data_dir": str(tmp_path / "img"), "epoch": 2}))
    assert main([str(cfg), "--out", str(tmp_path / "out"), "--write-dataset-settings"]) == 0
    assert (tmp_path / "img" / "5_zwx dog" / "multiply.txt").read_text() == "5\n"
    assert (tmp_path / "img" / "5_zwx dog" / "local.yaml").read_text() == 'main_prompt: "zwx dog"\n'


def test_imported_seed_configuration_trains_tiny_sd1_for_a_step(tmp_path):
    from trainer.config import load_config
    from trainer.run.loop import train
    from trainer.run.session import build_session

    assert main([str(SEED), "--out", str(tmp_path / "imported"), "--steps_per_epoch", "25"]) == 0
    config = tmp_path / "imported" / "train.json"
    overrides = base_args(
        tmp_path,
        resume_ckpt="builtin:tiny-sd1",
        data_root=copy_images(tmp_path / "images", 4),
        resolution=64,
        optimizer_config=str(tmp_path / "imported" / "optimizer.json"),
        stop_at_step=1,
        cache_latents=False,
    )
    cfg = load_config(str(config), overrides)
    assert (cfg.clip_skip, cfg.grad_accum, cfg.keep_tags, cfg.max_token_length) == (2, 2, 2, 225)
    session = build_session(cfg)
    try:
        summary = train(session)
    finally:
        session.close()
    assert summary.global_step == 1


def test_missing_source_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        from trainer.importing.convert import convert_file

        convert_file(tmp_path / "nope.json")
