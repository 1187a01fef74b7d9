"""`sdtrainer`: one command line with subcommands; `--help` lists every train.json key."""

from __future__ import annotations

import json

import pytest

from trainer.cli import SUBCOMMANDS, main
from trainer.cli_help import key_groups
from trainer.config import FIELDS, allowed_text


def test_help_lists_every_train_json_key_with_its_type_and_default(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key, field in FIELDS.items():
        assert f"--{key}  {allowed_text(key)}  (default {json.dumps(field.default)})" in out, key
    for sub in SUBCOMMANDS:
        assert f"sdtrainer {sub}" in out


def test_help_groups_the_keys_by_the_config_sections_and_places_each_key_once():
    groups = key_groups()
    placed = [key for _title, keys in groups for key in keys]
    assert sorted(placed) == sorted(FIELDS)
    titles = [title for title, _keys in groups]
    assert "optimisation" in titles and "checkpoints" in titles


def test_train_is_the_default_subcommand(capsys):
    assert main(["train", "--help"]) == 0
    assert "--resume_ckpt" in capsys.readouterr().out


@pytest.mark.parametrize("sub", sorted(SUBCOMMANDS))
def test_each_subcommand_answers_help(sub, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's --help exits 0
        main([sub, "--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out
