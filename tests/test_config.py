"""Config loading: precedence, strict validation, ED2 compatibility, and the docs table."""

import json
import re
from pathlib import Path

import pytest

from trainer.cli import split_config_arg
from trainer.config import keys_markdown, load_config, parse_cli_overrides
from trainer.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, data) -> str:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_cli_overrides_json_which_overrides_defaults(tmp_path):
    cfg = load_config(write(tmp_path, {"batch_size": 3, "max_epochs": 7}), ["--batch_size", "5"])
    assert cfg.batch_size == 5  # CLI wins
    assert cfg.max_epochs == 7  # JSON wins over default
    assert cfg.grad_accum == 1  # default


def test_unknown_cli_key_names_closest_match():
    with pytest.raises(ConfigError, match=r"unknown key 'batch_sizee'; did you mean 'batch_size'\?"):
        load_config(None, ["--batch_sizee", "2"])


def test_unknown_json_key_names_file_and_closest_match(tmp_path):
    path = write(tmp_path, {"learning_rat": 1e-4, "lr": 1e-4})
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    assert "train.json" in str(err.value) and "'learning_rat'" in str(err.value)


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--resolution", "-5"], "resolution"),
        (["--resolution", "500"], "resolution"),
        (["--batch_size", "0"], "batch_size"),
        (["--batch_size", "two"], "batch_size"),
        (["--flip_p", "1.5"], "flip_p"),
        (["--loss_type", "l3"], "loss_type"),
        (["--clip_skip", "9"], "clip_skip"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(argv, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, argv)
    message = str(err.value)
    assert f"key '{key}'" in message and "allowed:" in message


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="timestep_start"):
        load_config(None, ["--timestep_start", "900", "--timestep_end", "100"])
    with pytest.raises(ConfigError, match="nothing would train"):
        load_config(None, ["--disable_unet_training", "--disable_textenc_training"])


def test_bare_flag_booleans_lists_and_zero():
    cfg = load_config(
        None, ["--gradient_checkpointing", "--shuffle_tags", "false", "--data_root", "a", "b", "--lr", "0"]
    )
    assert cfg.gradient_checkpointing is True
    assert cfg.shuffle_tags is False
    assert cfg.data_root == ["a", "b"]
    assert cfg.lr == 0.0  # zero is a value, not "unset"
    assert parse_cli_overrides(["--data_root", '["x","y"]'])["data_root"] == ["x", "y"]


def test_ed2_nulls_mean_default_and_dead_keys_warn(tmp_path, caplog):
    path = write(
        tmp_path, {"ema_device": None, "ema_update_interval": None, "amp": True, "useadam8bit": True}
    )
    cfg = load_config(path, [])
    assert cfg.ema_device == "cpu" and cfg.ema_update_interval == 500
    warned = [r.getMessage() for r in caplog.records]
    assert any("'amp'" in m for m in warned) and any("'useadam8bit'" in m for m in warned)


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"batch_size": 2,\n "lr": }')
    with pytest.raises(ConfigError, match=r"line 2"):
        load_config(str(path), [])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.json"), [])


def test_shipped_train_json_is_valid():
    cfg = load_config(str(ROOT / "train.json"), [])
    assert cfg.resume_ckpt.startswith("builtin:")


def test_split_config_arg():
    assert split_config_arg(["--config", "a.json", "--lr", "1"]) == ("a.json", ["--lr", "1"])
    assert split_config_arg(["--config=b.json"]) == ("b.json", [])


def test_config_docs_table_is_current():
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    assert keys_markdown() in text, "docs/CONFIG.md is stale: regenerate with python -m trainer.config"


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "train").glob("*.json")), ids=lambda p: p.name)
def test_example_train_configs_load(path):
    data = json.loads(path.read_text())
    cfg = load_config(str(path), [])
    assert {k: getattr(cfg, k) for k in data} == data  # every key is read as written


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fused_back_pass": True, "grad_accum": 2}, "fused_back_pass needs grad_accum 1 (got 2)"),
        ({"fused_back_pass": True, "clip_grad_norm": 1.0}, "fused_back_pass cannot clip gradients"),
        ({"weight_dtype": "bf16", "mixed_precision": "fp16"}, "use mixed_precision bf16"),
        ({"cache_text_encoder_outputs": True}, "needs disable_textenc_training: true"),
        ({"compile": True, "compile_backend": "aot_eager", "compile_mode": "max-autotune"}, "only applies"),
    ],
)
def test_speed_option_conflicts_name_both_keys_and_the_fix(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, overrides), [])
