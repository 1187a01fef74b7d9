"""Inputs that would stop a run after the model loaded are found before it loads (issue 29 items
5 and 6): a misspelled lr_scheduler in optimizer.json, a data folder without a single image, and
`attn_type: xformers` where xformers cannot run. Each test makes the model loader fail loudly, so
a check that only happens after loading fails the test."""

from __future__ import annotations

import json

import pytest

from tests.helpers import ROOT, base_args, copy_images
from trainer.config import load_config
from trainer.runtime.errors import ConfigError


@pytest.fixture
def no_model_load(monkeypatch):
    import trainer.parts.builder as builder_mod

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(builder_mod, "load_model", no_load)


def session_error(tmp_path, **overrides) -> str:
    """build_session's ConfigError for the quick start's train.json plus `overrides`."""
    import trainer.run.session as session_mod

    values = {"data_root": copy_images(tmp_path / "data", 2), "resolution": 64, **overrides}
    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path, **values))
    with pytest.raises(ConfigError) as err:
        session_mod.build_session(cfg)
    assert not (tmp_path / "logs").exists()  # no run folder for a run that never started
    return str(err.value)


def optimizer_file(tmp_path, base: dict) -> str:
    path = tmp_path / "optimizer.json"
    path.write_text(json.dumps({"base": base}))
    return str(path)


def test_a_misspelled_lr_scheduler_in_optimizer_json_is_refused_before_the_model_loads(
    tmp_path, no_model_load
):
    opt = optimizer_file(tmp_path, {"optimizer": "adamw", "lr_scheduler": "cosinee"})
    message = session_error(tmp_path, optimizer_config=opt)
    assert f"{opt}: base.lr_scheduler: unknown scheduler 'cosinee'. Did you mean 'cosine'?" in message


def test_optimizer_json_problems_are_reported_with_the_other_input_problems(tmp_path, no_model_load):
    opt = optimizer_file(tmp_path, {"optimizer": "adamw", "lr_scheduler": "cosinee"})
    (tmp_path / "empty").mkdir()
    message = session_error(tmp_path, optimizer_config=opt, data_root=str(tmp_path / "empty"))
    assert "2 problems with the inputs" in message
    assert "unknown scheduler 'cosinee'" in message and "has 0 images" in message


@pytest.mark.parametrize(
    "layout",
    [
        {},  # an empty folder
        {"a.txt": "a caption without its image", ".hidden.png": "", "sub/.x/b.jpg": ""},
        {"photo-masklabel.png": ""},  # a mask is never a training image
    ],
    ids=["empty", "captions-and-hidden-only", "mask-only"],
)
def test_a_data_folder_without_any_image_is_refused_before_the_model_loads(tmp_path, no_model_load, layout):
    root = tmp_path / "images"
    root.mkdir()
    for name, text in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    message = session_error(tmp_path, data_root=str(root))
    assert f"data_root '{root}' has 0 images" in message and ".png" in message


def test_an_image_anywhere_under_data_root_passes_the_early_check(tmp_path):
    from trainer.run.preflight import check_inputs

    root = tmp_path / "images"
    copy_images(root / "deep" / "er", 1)
    (tmp_path / "empty").mkdir()
    values = {"data_root": json.dumps([str(tmp_path / "empty"), str(root)]), "resolution": 64}
    check_inputs(load_config(str(ROOT / "train.json"), base_args(tmp_path, **values)))


def test_attn_type_xformers_without_xformers_is_refused_before_the_model_loads(
    tmp_path, no_model_load, monkeypatch
):
    import trainer.parts.attention as attention_mod

    monkeypatch.setattr(attention_mod, "is_xformers_available", lambda: False)
    message = session_error(tmp_path, attn_type="xformers")
    assert "attn_type 'xformers'" in message and "not installed" in message and "attn_type sdp" in message


def test_attn_type_xformers_needs_cuda(monkeypatch):
    import trainer.parts.attention as attention_mod

    monkeypatch.setattr(attention_mod, "is_xformers_available", lambda: True)
    assert "needs a CUDA device" in attention_mod.xformers_problem("cpu")
    assert attention_mod.xformers_problem("cuda") is None


def test_wandb_without_the_package_is_refused_before_the_model_loads(tmp_path, no_model_load, monkeypatch):
    """wandb: true without wandb installed used to fail after the model had loaded and the run
    folder was made; it is an input problem like the others."""
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, find_spec finds none
    message = session_error(tmp_path, wandb=True)
    assert "wandb: true" in message and "pip install wandb" in message
