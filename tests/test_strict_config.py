"""Strict input (issue 29 items 2 and 5): JSON values of the wrong type and non-finite numbers are
refused in train.json and optimizer.json, naming the file, the key, the value and its type; the
command line's strings are read as the key's type first, so `--batch_size 4` still works."""

from __future__ import annotations

import json
import logging
import typing

import pytest

from trainer.config import FIELDS, build_config, load_config, parse_cli_overrides
from trainer.optim.schema import SectionConfig, parse_optimizer_json
from trainer.runtime.errors import ConfigError


def float_keys(fields) -> list[str]:
    """The keys whose annotation takes a float (alone or in a union)."""
    out = []
    for name, field in fields.items():
        pending = [field.annotation]
        while pending:
            ann = pending.pop()
            args = typing.get_args(ann)
            if ann is float:
                out.append(name)
                break
            pending += [a for a in args if not isinstance(a, str | int)]
    return out


def write_json_text(tmp_path, text: str, name: str = "train.json") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- item 2: inf / NaN ---------------------------------------------------------------------------

TRAIN_FLOAT_KEYS = float_keys(FIELDS)


def test_the_float_key_lists_cover_the_keys_the_issue_names():
    assert {"lr", "flip_p", "min_snr_gamma", "stop_text_encoder_training"} <= set(TRAIN_FLOAT_KEYS)
    assert {"lr", "epsilon", "weight_decay", "betas", "d_coef"} <= set(float_keys(SectionConfig.model_fields))


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
@pytest.mark.parametrize("key", TRAIN_FLOAT_KEYS)
def test_train_json_refuses_non_finite_numbers_for_every_float_key(tmp_path, key, literal):
    path = write_json_text(tmp_path, f'{{"{key}": {literal}}}')
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    message = str(err.value)
    assert f"{path}: key '{key}'" in message and "finite" in message


@pytest.mark.parametrize("value", ["inf", "Infinity", "nan", "-inf"])
def test_the_command_line_refuses_non_finite_numbers(value):
    with pytest.raises(ConfigError, match=r"command line: key 'lr' = .*finite"):
        load_config(None, ["--lr", value])


OPTIM_FLOAT_KEYS = [k for k in float_keys(SectionConfig.model_fields) if k != "betas"]


@pytest.mark.parametrize("literal", ["Infinity", "NaN"])
@pytest.mark.parametrize("key", OPTIM_FLOAT_KEYS)
def test_optimizer_json_refuses_non_finite_numbers_for_every_float_key(key, literal):
    text = f'{{"base": {{"optimizer": "adamw", "{key}": {literal}}}}}'
    with pytest.raises(ConfigError) as err:
        parse_optimizer_json(text, "my/optimizer.json")
    message = str(err.value)
    assert f"my/optimizer.json: base.{key}" in message and "finite" in message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('{"base": {"optimizer": "adamw", "betas": [0.9, Infinity]}}', "base.betas"),
        ('{"text_encoder_overrides": {"lr": Infinity}}', "text_encoder_overrides.lr"),
        ('{"text_encoder_lr_scale": NaN}', "text_encoder_lr_scale"),
        (
            '{"base": {"optimizer": "pytorch_optimizer.Lamb", "max_grad_norm": Infinity}}',
            "base.max_grad_norm",
        ),
    ],
)
def test_optimizer_json_refuses_non_finite_numbers_in_lists_sections_and_bridged_options(text, where):
    with pytest.raises(ConfigError) as err:
        parse_optimizer_json(text, "my/optimizer.json")
    message = str(err.value)
    assert f"my/optimizer.json: {where}" in message and "finite" in message


# ---- item 5: loose types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "kind", "expected"),
    [
        ("cache_latents", "yes", "a string", "bool"),
        ("batch_size", "4", "a string", "int"),
        ("max_epochs", True, "a boolean", "int"),
        ("lr", "1e-3", "a string", "float"),
        ("resolution", 512.0, "a number", "int"),
        ("data_root", 7, "an integer", "str"),
    ],
)
def test_train_json_refuses_a_wrong_type_naming_file_key_value_type_and_expected(
    tmp_path, key, value, kind, expected
):
    path = write_json_text(tmp_path, json.dumps({key: value}))
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    message = str(err.value)
    assert f"{path}: key '{key}' = {value!r} ({kind})" in message
    assert f"allowed: {expected}" in message


def test_a_quoted_number_or_boolean_says_to_drop_the_quotes(tmp_path):
    path = write_json_text(tmp_path, json.dumps({"batch_size": "4", "cache_latents": "true"}))
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    message = str(err.value)
    assert 'write "batch_size": 4 without quotes' in message
    assert 'write "cache_latents": true without quotes' in message


def test_ints_stay_valid_for_float_keys_and_typed_strings_stay_valid_on_the_command_line(tmp_path):
    cfg = load_config(write_json_text(tmp_path, json.dumps({"lr": 1, "flip_p": 0})), [])
    assert (cfg.lr, cfg.flip_p) == (1.0, 0.0) and isinstance(cfg.lr, float)
    cfg = load_config(None, ["--batch_size", "4", "--lr", "1e-3", "--cache_latents", "true"])
    assert (cfg.batch_size, cfg.lr, cfg.cache_latents) == (4, 1e-3, True)


def test_command_line_strings_are_read_as_the_keys_type():
    values = parse_cli_overrides(
        [
            "--stop_text_encoder_training",
            "100",
            "--max_token_length",
            "150",
            "--project_name",
            "2024",
            "--sample_prompts",
            "null",
            "--ckpt_every_n_minutes",
            "5",
            "--shuffle_tags",
            "False",
            "--gradient_checkpointing",
        ]
    )
    assert values == {
        "stop_text_encoder_training": 100,
        "max_token_length": 150,
        "project_name": "2024",
        "sample_prompts": None,
        "ckpt_every_n_minutes": 5.0,
        "shuffle_tags": False,
        "gradient_checkpointing": True,
    }
    assert type(values["ckpt_every_n_minutes"]) is float
    assert parse_cli_overrides(["--stop_text_encoder_training", "0.5"]) == {"stop_text_encoder_training": 0.5}


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--max_epochs", "true"], "key 'max_epochs' = 'true' (a string)"),
        (["--batch_size", "4.0"], "key 'batch_size' = '4.0' (a string)"),
        (["--cache_latents", "yes"], "key 'cache_latents' = 'yes' (a string)"),
        (["--lr", "fast"], "key 'lr' = 'fast' (a string)"),
        (["--batch_size"], "key 'batch_size' = True (a boolean)"),
    ],
)
def test_command_line_values_that_are_not_the_keys_type_are_refused(argv, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, argv)
    assert f"command line: {fragment}" in str(err.value)


def test_several_values_for_a_key_that_takes_one_are_refused():
    with pytest.raises(ConfigError, match=r"command line: --batch_size takes one value, got 2: 2 3"):
        parse_cli_overrides(["--batch_size", "2", "3"])


def test_optimizer_json_wrong_types_name_file_key_value_type_and_expected():
    text = json.dumps({"base": {"optimizer": "adamw", "lr": "1e-4", "amsgrad": 1}})
    with pytest.raises(ConfigError) as err:
        parse_optimizer_json(text, "my/optimizer.json")
    message = str(err.value)
    assert "my/optimizer.json: base.lr: Input should be a valid number; got '1e-4' (a string)" in message
    assert "expected float" in message
    assert "my/optimizer.json: base.amsgrad: Input should be a valid boolean; got 1 (an integer)" in message
    assert "expected bool" in message


# ---- item 5: lr_scheduler ------------------------------------------------------------------------


def test_a_misspelled_lr_scheduler_in_train_json_is_refused_with_the_closest_name(tmp_path):
    path = write_json_text(tmp_path, json.dumps({"lr_scheduler": "cosinee"}))
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    assert f"{path}: key 'lr_scheduler' = 'cosinee' (a string)" in str(err.value)
    assert "did you mean 'cosine'?" in str(err.value)
    assert build_config({"lr_scheduler": "cosine"}, {}, source="t").lr_scheduler == "cosine"


def test_a_misspelled_lr_scheduler_stops_the_command_before_any_model_loads(tmp_path, monkeypatch, caplog):
    import trainer.parts.builder as builder_mod
    from trainer import cli

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before lr_scheduler was checked")

    monkeypatch.setattr(builder_mod, "load_model", no_load)
    path = write_json_text(tmp_path, json.dumps({"lr_scheduler": "cosinee"}))
    with caplog.at_level(logging.ERROR):
        assert cli.main(["--config", path]) == 2
    assert any("did you mean 'cosine'?" in r.getMessage() for r in caplog.records)
