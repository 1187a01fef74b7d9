"""optimizer.json parsing, error messages and LR precedence."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_text_encoder
from optim_models import Regressor, build_from_json

from trainer.optim import TrainOptimSettings, load_optimizer_file, parse_optimizer_json, resolve_components
from trainer.runtime.errors import ConfigError


def _resolve(config: dict | None, steps: int = 1000, **settings):
    opt_file = parse_optimizer_json(json.dumps(config), "optimizer.json")
    return resolve_components(opt_file, TrainOptimSettings(**settings), steps)


# ---- defaults --------------------------------------------------------------------------------


def test_no_file_means_documented_defaults():
    opt_file = load_optimizer_file(None)
    r = resolve_components(opt_file, TrainOptimSettings(lr=2e-6), 100)
    for comp in r.values():
        assert comp.optimizer == "adamw8bit"
        assert comp.options["betas"] == (0.9, 0.999)
        assert comp.options["weight_decay"] == 0.01
        assert comp.options["epsilon"] == 1e-8
        assert comp.lr == 2e-6
    assert opt_file.apply_grad_scaler_step_tweaks is True
    assert opt_file.as_dict()["base"]["optimizer"] == "adamw8bit"


def test_json_null_means_defaults():
    assert parse_optimizer_json("null").as_dict() == load_optimizer_file(None).as_dict()


def test_as_dict_round_trips(tmp_path):
    opt_file = load_optimizer_file("optimizerSD21.json")
    path = tmp_path / "effective.json"
    path.write_text(json.dumps(opt_file.as_dict()))
    again = load_optimizer_file(path)
    assert again.as_dict() == opt_file.as_dict()
    assert resolve_components(again, TrainOptimSettings(), 50) == resolve_components(
        opt_file, TrainOptimSettings(), 50
    )


def test_ed2_keys_doc_and_log_grad_norm_accepted():
    opt_file = parse_optimizer_json(
        json.dumps({"doc": {"x": "y"}, "log_grad_norm": False, "base": {"lr": 1e-6}})
    )
    assert opt_file.log_grad_norm is False


def test_optimizer_names_are_case_insensitive():
    r = _resolve({"base": {"optimizer": "AdamW8Bit", "lr": 1e-6}})
    assert r["unet"].optimizer == "adamw8bit"


def test_lion_ignores_ed2_epsilon_with_warning(caplog):
    r = _resolve({"base": {"optimizer": "lion", "lr": 1e-7, "epsilon": 1e-8, "betas": [0.9, 0.99]}})
    assert "epsilon" not in r["unet"].options
    assert "does not use epsilon" in caplog.text


# ---- LR precedence ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train_lr", "base_lr", "te_lr", "scale", "want_unet", "want_te"),
    [
        (None, 1e-6, None, None, 1e-6, 1e-6),  # TE copies base
        (3e-6, 1e-6, None, None, 3e-6, 3e-6),  # train lr overrides base and the copied TE lr
        (3e-6, 1e-6, 5e-7, None, 3e-6, 5e-7),  # explicit TE lr never overridden by train lr
        (None, 1e-6, None, 0.5, 1e-6, 5e-7),  # scale applies when copied
        (3e-6, None, None, 0.5, 3e-6, 1.5e-6),  # ... also to a copied train lr
        (None, 1e-6, 2e-7, 0.5, 1e-6, 2e-7),  # scale ignored when TE lr is explicit
        (0.0, 1e-6, None, None, 0.0, 0.0),  # 0 is a value, not "unset"
        (None, 0.0, None, None, 0.0, 0.0),
        (None, 1e-6, 0.0, None, 1e-6, 0.0),
    ],
)
def test_lr_precedence(train_lr, base_lr, te_lr, scale, want_unet, want_te):
    config = {
        "base": {"optimizer": "adamw", "lr": base_lr},
        "text_encoder_overrides": {"lr": te_lr},
        "text_encoder_lr_scale": scale,
    }
    r = _resolve(config, lr=train_lr)
    assert r["unet"].lr == pytest.approx(want_unet)
    assert r["text_encoder"].lr == pytest.approx(want_te)


def test_scale_ignored_warning(caplog):
    _resolve({"base": {"lr": 1e-6}, "text_encoder_overrides": {"lr": 2e-7}, "text_encoder_lr_scale": 0.5})
    assert "text_encoder_lr_scale=0.5 is ignored" in caplog.text


def test_scale_without_any_lr_is_refused():
    """Issue 13 item 6: with no LR anywhere both components took the optimizer default and the
    scale vanished silently."""
    config = {"base": {"optimizer": "adamw"}, "text_encoder_lr_scale": 0.5}
    with pytest.raises(
        ConfigError, match=r"text_encoder_lr_scale=0.5 has nothing to scale.*Set lr or base.lr"
    ):
        _resolve(config)
    assert _resolve(config, lr=1e-6)["text_encoder"].lr == pytest.approx(5e-7)
    # nothing to refuse: a neutral scale, or a frozen text encoder that has no LR at all
    assert _resolve({**config, "text_encoder_lr_scale": 1.0})["text_encoder"].lr == 1e-6  # adamw default
    assert _resolve(config, disable_textenc_training=True)["unet"].lr == 1e-6


def test_zero_weight_decay_on_te_is_kept():
    r = _resolve(
        {"base": {"weight_decay": 0.01, "lr": 1e-6}, "text_encoder_overrides": {"weight_decay": 0.0}}
    )
    assert r["unet"].options["weight_decay"] == 0.01
    assert r["text_encoder"].options["weight_decay"] == 0.0


def test_schedule_keys_section_before_train_settings():
    r = _resolve(
        {"base": {"lr": 1e-6, "lr_scheduler": "linear", "lr_warmup_steps": 0}, "text_encoder_overrides": {}},
        lr_scheduler="cosine",
        lr_warmup_steps=7,
        lr_decay_steps=300,
    )
    assert (r["unet"].lr_scheduler, r["unet"].lr_warmup_steps, r["unet"].lr_decay_steps) == ("linear", 0, 300)
    r = _resolve({"base": {"lr": 1e-6}}, lr_scheduler="cosine", lr_warmup_steps=7)
    assert (r["unet"].lr_scheduler, r["unet"].lr_warmup_steps) == ("cosine", 7)


def test_te_with_other_optimizer_inherits_only_keys_it_takes():
    r = _resolve(
        {
            "base": {"optimizer": "adamw", "lr": 1e-6, "amsgrad": True, "weight_decay": 0.02},
            "text_encoder_overrides": {"optimizer": "lion", "lr": 1e-7},
        }
    )
    assert r["text_encoder"].options == {"weight_decay": 0.02}
    assert r["unet"].options["amsgrad"] is True


def test_adafactor_adaptive_ignores_lr_and_uses_its_schedule(caplog):
    r = _resolve({"base": {"optimizer": "adafactor"}}, lr=1e-5, lr_scheduler="constant")
    assert r["unet"].lr is None
    assert r["unet"].lr_scheduler == "adafactor"
    assert "ignores lr" in caplog.text
    with pytest.raises(ConfigError, match="needs lr_scheduler 'adafactor'"):
        _resolve({"base": {"optimizer": "adafactor", "lr_scheduler": "cosine"}})
    with pytest.raises(ConfigError, match="only works with optimizer 'adafactor'"):
        _resolve({"base": {"optimizer": "adamw", "lr": 1e-6, "lr_scheduler": "adafactor"}})


def test_ed2_defaults_for_adaptive_optimizers():
    r = _resolve({"base": {"optimizer": "prodigy"}}, log_step=10)
    assert r["unet"].lr == 1.0
    assert r["unet"].options["use_bias_correction"] is True
    assert r["unet"].options["safeguard_warmup"] is True
    r = _resolve({"base": {"optimizer": "dadapt_adam"}}, log_step=10)
    assert r["unet"].options["decouple"] is True
    assert r["unet"].options["log_every"] == 10


# ---- errors ----------------------------------------------------------------------------------


def test_misspelled_key_names_path_and_closest_match():
    with pytest.raises(ConfigError, match=r"optimizer.json: base.betaz: unknown key; did you mean 'betas'\?"):
        parse_optimizer_json('{"base": {"betaz": [0.9, 0.99]}}', "optimizer.json")
    with pytest.raises(
        ConfigError, match=r"text_encoder_freezing.unfreeze_final_n_layers: .*'unfreeze_last_n_layers'"
    ):
        parse_optimizer_json('{"text_encoder_freezing": {"unfreeze_final_n_layers": 2}}')


def test_key_of_another_optimizer_lists_accepted_keys():
    with pytest.raises(ConfigError) as info:
        parse_optimizer_json('{"base": {"optimizer": "adamw", "d0": 1e-6}}', "my.json")
    msg = str(info.value)
    assert "my.json: base.d0: optimizer 'adamw' does not take 'd0'" in msg
    assert "amsgrad" in msg and "weight_decay" in msg
    with pytest.raises(ConfigError, match="text_encoder_overrides.nesterov"):
        parse_optimizer_json(
            '{"base": {"optimizer": "sgd"}, "text_encoder_overrides": {"optimizer": "adam", "nesterov": true}}'
        )


def test_unknown_optimizer_lists_names_and_closest():
    with pytest.raises(ConfigError) as info:
        parse_optimizer_json('{"base": {"optimizer": "adamw9bit"}}')
    msg = str(info.value)
    assert "Did you mean 'adamw8bit'?" in msg
    assert "prodigy" in msg and "dadapt_adan" in msg and "paged_adamw8bit" in msg


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=str(missing)):
        load_optimizer_file(missing)


def test_bad_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "base": {\n    "lr": 1e-6,\n  }\n}')
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 4, column 3"):
        load_optimizer_file(path)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"base.lr_warmup_steps: .*integer"):
        parse_optimizer_json('{"base": {"lr_warmup_steps": 1.5}}')
    with pytest.raises(ConfigError, match=r"base.betas: optimizer 'dadapt_adan' needs 3 values"):
        parse_optimizer_json('{"base": {"optimizer": "dadapt_adan", "betas": [0.9, 0.99]}}')
    with pytest.raises(ConfigError, match=r"unknown scheduler 'cosin'. Did you mean 'cosine'"):
        parse_optimizer_json('{"base": {"lr_scheduler": "cosin"}}')


def test_both_components_disabled_is_refused():
    """train.json validation says it (tests/test_config.py); the optimizer build asserts it."""
    with pytest.raises(AssertionError, match="nothing would train"):
        build_from_json(
            {"base": {"lr": 1e-3}},
            unet=Regressor(),
            text_encoder=tiny_text_encoder(2),
            disable_unet_training=True,
            disable_textenc_training=True,
        )


def test_missing_optional_package_names_pip_package(monkeypatch):
    import sys

    from trainer.optim import OptionalDependencyError, get_spec

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # makes `import prodigyopt` raise ImportError
    with pytest.raises(OptionalDependencyError, match="pip install prodigyopt"):
        get_spec("prodigy").load_class()
    with pytest.raises(ImportError):  # also an ImportError for callers that expect one
        get_spec("prodigy").load_class()
