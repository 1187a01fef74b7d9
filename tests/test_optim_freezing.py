"""Text-encoder freezing: the exact trainable parameter set per setting, and no grads on frozen ones."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_text_encoder
from optim_models import Regressor, build_from_json

from trainer.optim import FreezingConfig, plan_text_encoder_freeze
from trainer.runtime.errors import ConfigError

N_LAYERS = 4


def _prefix(name: str) -> str:
    """'embeddings', 'final_layer_norm' or 'layer<i>' for a CLIP text parameter name."""
    name = name.removeprefix("text_model.")
    if name.startswith("encoder.layers."):
        return "layer" + name.split(".")[2]
    return name.split(".")[0]


def _trainable_groups(freezing: dict, clip_skip: int = 0) -> set[str]:
    te = tiny_text_encoder(N_LAYERS)
    opt_set = build_from_json(
        {"base": {"optimizer": "adamw", "lr": 1e-3}, "text_encoder_freezing": freezing},
        unet=Regressor(),
        text_encoder=te,
        clip_skip=clip_skip,
    )
    trainable = {n for n, p in te.named_parameters() if p.requires_grad}
    assert set(opt_set.components["text_encoder"].param_names) == trainable
    frozen = {n for n, p in te.named_parameters() if not p.requires_grad}
    counts = opt_set.trainable_parameter_count()["text_encoder"]
    assert counts == (
        sum(p.numel() for n, p in te.named_parameters() if n in trainable),
        sum(p.numel() for n, p in te.named_parameters() if n in frozen),
    )
    return {_prefix(n) for n in trainable}


ALL = {"embeddings", "final_layer_norm", "layer0", "layer1", "layer2", "layer3"}


@pytest.mark.parametrize(
    ("freezing", "clip_skip", "expected"),
    [
        ({}, 0, ALL),
        ({"unfreeze_last_n_layers": None}, 1, ALL),
        ({"unfreeze_last_n_layers": 0}, 0, {"final_layer_norm"}),
        ({"unfreeze_last_n_layers": 2}, 0, {"layer2", "layer3", "final_layer_norm"}),
        ({"unfreeze_last_n_layers": 4}, 0, ALL),  # all layers -> embeddings not frozen by default
        (
            {"unfreeze_last_n_layers": 2, "freeze_embeddings": False},
            0,
            {"embeddings", "layer2", "layer3", "final_layer_norm"},
        ),
        # freeze_front_n_layers becomes unfreeze_last_n_layers as in ED2, so the embeddings then
        # default to frozen too (issue 13 item 4).
        ({"freeze_front_n_layers": 1}, 0, {"layer1", "layer2", "layer3", "final_layer_norm"}),
        ({"freeze_front_n_layers": -1}, 0, {"layer3", "final_layer_norm"}),
        ({"freeze_front_n_layers": 0}, 0, ALL),  # = unfreeze all 4: embeddings stay trainable
        ({"freeze_front_n_layers": -4}, 0, ALL),
        ({"freeze_front_n_layers": 4}, 0, {"final_layer_norm"}),
        (
            {"freeze_front_n_layers": 2, "freeze_embeddings": False},
            0,
            {"embeddings", "layer2", "layer3", "final_layer_norm"},
        ),
        ({"unfreeze_last_n_layers": 1, "freeze_front_n_layers": 1}, 0, {"layer3", "final_layer_norm"}),
        # ED2: a present unfreeze_last_n_layers wins even as null (= all layers), as in its shipped file
        ({"unfreeze_last_n_layers": None, "freeze_front_n_layers": 2}, 0, ALL),
        ({"freeze_embeddings": True}, 0, ALL - {"embeddings"}),
        ({"freeze_final_layer_norm": True}, 0, ALL - {"final_layer_norm"}),
        ({}, 2, ALL - {"layer3"}),  # clip_skip 2 reads hidden_states[-2]: the last layer is unused
        ({}, 3, ALL - {"layer2", "layer3"}),
        ({"unfreeze_last_n_layers": 2}, 2, {"layer2", "final_layer_norm"}),
    ],
)
def test_trainable_sets(freezing, clip_skip, expected):
    assert _trainable_groups(freezing, clip_skip) == expected


def test_plan_reports_clip_skip_unused_layers():
    plan = plan_text_encoder_freeze(FreezingConfig(), 12, clip_skip=2)
    assert plan.unused_layers == (11,)
    assert "frozen as unused by clip_skip: [11]" in plan.describe()
    with pytest.raises(ConfigError, match="unfreeze_last_n_layers: must be >= 0"):
        plan_text_encoder_freeze(FreezingConfig(unfreeze_last_n_layers=-1), 12)
    with pytest.raises(ConfigError, match=r"freeze_front_n_layers: -13 is outside -12..12"):
        plan_text_encoder_freeze(FreezingConfig(freeze_front_n_layers=-13), 12)


def test_the_overridden_freeze_front_n_layers_is_warned_about(caplog):
    plan = plan_text_encoder_freeze(FreezingConfig(unfreeze_last_n_layers=None, freeze_front_n_layers=3), 12)
    assert plan.trainable_layers == tuple(range(12)) and not plan.freeze_embeddings
    assert "unfreeze_last_n_layers=None overrides freeze_front_n_layers=3" in caplog.text


def test_effective_optimizer_file_keeps_the_freezing_it_was_given(tmp_path):
    """The run folder's optimizer_effective.json must not add `unfreeze_last_n_layers: null`,
    which would override freeze_front_n_layers when the file is used again."""
    from trainer.optim import parse_optimizer_json

    first = parse_optimizer_json('{"text_encoder_freezing": {"freeze_front_n_layers": 3}}')
    again = parse_optimizer_json(json.dumps(first.as_dict()))
    assert first.as_dict()["text_encoder_freezing"] == {"freeze_front_n_layers": 3}
    assert plan_text_encoder_freeze(again.text_encoder_freezing, 12) == plan_text_encoder_freeze(
        first.text_encoder_freezing, 12
    )


def test_frozen_parameters_get_no_grad_and_do_not_change():
    te = tiny_text_encoder(N_LAYERS)
    unet = Regressor()
    opt_set = build_from_json(
        {"base": {"optimizer": "adamw", "lr": 1e-2}, "text_encoder_freezing": {"unfreeze_last_n_layers": 1}},
        unet=unet,
        text_encoder=te,
        clip_skip=2,
    )
    before = {n: p.detach().clone() for n, p in te.named_parameters()}
    ids = torch.randint(0, 1000, (2, 8))
    hidden = te(ids, output_hidden_states=True).hidden_states[-2]
    core = getattr(te, "text_model", te)
    loss = core.final_layer_norm(hidden).pow(2).mean() + unet(torch.randn(2, 64)).mean()
    loss.backward()
    # unfreeze_last_n_layers 1 + clip_skip 2: layer 3 is both the only unfrozen layer and unused.
    with_grad = {n for n, p in te.named_parameters() if p.grad is not None}
    assert {_prefix(n) for n in with_grad} == {"final_layer_norm"}
    result = opt_set.step()
    assert not result.skipped
    for n, p in te.named_parameters():
        assert p.grad is None
        changed = not torch.equal(p, before[n])
        assert changed == (_prefix(n) == "final_layer_norm"), n


def test_disable_textenc_training_freezes_everything():
    te = tiny_text_encoder(2)
    opt_set = build_from_json(
        {"base": {"lr": 1e-3}}, unet=Regressor(), text_encoder=te, disable_textenc_training=True
    )
    assert list(opt_set.components) == ["unet"]
    assert not any(p.requires_grad for p in te.parameters())


def test_disable_unet_training_freezes_unet():
    unet = Regressor()
    opt_set = build_from_json(
        {"base": {"lr": 1e-3}}, unet=unet, text_encoder=tiny_text_encoder(2), disable_unet_training=True
    )
    assert list(opt_set.components) == ["text_encoder"]
    assert not any(p.requires_grad for p in unet.parameters())


def test_everything_frozen_is_an_error():
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        build_from_json(
            {
                "base": {"lr": 1e-3},
                "text_encoder_freezing": {"unfreeze_last_n_layers": 0, "freeze_final_layer_norm": True},
            },
            unet=Regressor(),
            text_encoder=tiny_text_encoder(2),
        )
