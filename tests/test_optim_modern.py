"""Schedule-free AdamW/SGD/RAdam, Prodigy + schedule-free, CAME, ADOPT and the pytorch_optimizer.<Name>
bridge: names, lazy imports, the constant-schedule rule, eval-mode weights, exact state and resume.

Fitting and the one-step state round trip of every name are in test_optim_registry.py.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from helpers import tiny_text_encoder
from optim_models import Regressor, build_from_json, regression_data
from torch import nn

from tests.helpers import (
    assert_bitwise_equal,
    checkpoint_dirs,
    copy_images,
    pipeline_weights,
    train_in_process,
)
from trainer.optim import OptionalDependencyError, eval_weights, get_spec, parse_optimizer_json
from trainer.optim.fused_backward import check_fused_backward
from trainer.runtime.errors import CheckpointError, ConfigError

SCHEDULE_FREE = {
    "adamw_schedulefree": {"lr": 1e-2},
    "sgd_schedulefree": {"lr": 0.05},
    "radam_schedulefree": {"lr": 1e-2},
    "prodigy_schedulefree": {"lr": 1.0, "d0": 1e-3},
    "pytorch_optimizer.ScheduleFreeAdamW": {"lr": 1e-2},
}


def _build(base: dict, model: nn.Module, steps: int = 100, **settings):
    return build_from_json(
        {"base": base},
        unet=model,
        text_encoder=tiny_text_encoder(2),
        steps=steps,
        disable_textenc_training=True,
        **settings,
    )


def _steps(model, opt_set, n: int) -> None:
    x, y = regression_data()
    for _ in range(n):
        nn.functional.mse_loss(model(x), y).backward()
        assert not opt_set.step().skipped


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("written", "name"),
    [
        ("AdamW_ScheduleFree", "adamw_schedulefree"),
        ("SGD-SCHEDULEFREE", "sgd_schedulefree"),
        ("radam_schedulefree", "radam_schedulefree"),
        ("Prodigy_ScheduleFree", "prodigy_schedulefree"),
        ("CAME", "came"),
        ("Adopt", "adopt"),
        ("pytorch_optimizer.AdaBelief", "pytorch_optimizer.adabelief"),
    ],
)
def test_names_are_case_insensitive(written, name):
    assert get_spec(written).name == name


@pytest.mark.parametrize(
    ("optimizer", "module", "package"),
    [
        ("adamw_schedulefree", "schedulefree", "schedulefree"),
        ("prodigy_schedulefree", "prodigyplus", "prodigy-plus-schedule-free"),
        ("came", "pytorch_optimizer", "pytorch-optimizer"),
        ("adopt", "pytorch_optimizer", "pytorch-optimizer"),
        ("pytorch_optimizer.Lamb", "pytorch_optimizer", "pytorch-optimizer"),
    ],
)
def test_missing_package_is_an_error_naming_it_only_when_chosen(monkeypatch, optimizer, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    model = Regressor()
    _build({"optimizer": "adamw", "lr": 1e-3}, model)  # other optimizers are unaffected
    with pytest.raises(OptionalDependencyError, match=f"pip install {package}"):
        _build({"optimizer": optimizer, "lr": 1e-3}, model)


def test_bridge_takes_keys_from_the_signature_and_refuses_others_with_closest():
    model = Regressor()
    opt_set = _build(
        {
            "optimizer": "pytorch_optimizer.AdaBelief",
            "lr": 1e-2,
            "rectify": False,
            "epsilon": 1e-12,
            "betas": [0.8, 0.99],
        },
        model,
    )
    optimizer = opt_set.components["unet"].optimizer
    assert type(optimizer).__name__ == "AdaBelief"
    group = optimizer.param_groups[0]
    assert (group["rectify"], group["eps"], group["betas"]) == (False, 1e-12, (0.8, 0.99))
    before = nn.functional.mse_loss(model(regression_data()[0]), regression_data()[1]).item()
    _steps(model, opt_set, 30)
    assert nn.functional.mse_loss(model(regression_data()[0]), regression_data()[1]).item() < 0.75 * before

    with pytest.raises(ConfigError, match=r"does not take 'rectfy'\. Did you mean 'rectify'\?"):
        parse_optimizer_json(
            json.dumps({"base": {"optimizer": "pytorch_optimizer.AdaBelief", "rectfy": True}})
        )
    with pytest.raises(ConfigError, match=r"Did you mean 'pytorch_optimizer\.adabelief'\?"):
        parse_optimizer_json(json.dumps({"base": {"optimizer": "pytorch_optimizer.adabelif"}}))
    # The text encoder inherits the bridge optimizer, and its own signature keys with it.
    te = {"optimizer": "pytorch_optimizer.AdaBelief", "rectify": True}
    opt_file = parse_optimizer_json(json.dumps({"base": te, "text_encoder_overrides": {"rectify": False}}))
    assert opt_file.text_encoder_overrides.set_values() == {"rectify": False}
    # A key of another optimizer's section model is still refused for a classic optimizer.
    with pytest.raises(ConfigError, match="unknown key"):
        parse_optimizer_json(json.dumps({"base": {"optimizer": "adamw", "rectify": True}}))


def test_bridge_effective_file_loads_again_to_the_same_settings():
    text = json.dumps({"base": {"optimizer": "pytorch_optimizer.AdaBelief", "rectify": False, "lr": 1e-3}})
    opt_file = parse_optimizer_json(text)
    again = parse_optimizer_json(json.dumps(opt_file.as_dict()))
    assert (
        again.base.set_values()
        == opt_file.base.set_values()
        == {
            "optimizer": "pytorch_optimizer.AdaBelief",
            "lr": 1e-3,
            "rectify": False,
        }
    )


@pytest.mark.parametrize("name", sorted(SCHEDULE_FREE))
def test_schedule_free_refuses_a_non_constant_schedule(name):
    with pytest.raises(
        ConfigError,
        match=r"schedule-free and needs lr_scheduler 'constant', got 'cosine' \(from optimizer\.json\)",
    ):
        _build({"optimizer": name, "lr_scheduler": "cosine"}, Regressor())
    with pytest.raises(ConfigError, match=r"got 'linear' \(from train\.json/CLI\).*warmup_steps"):
        _build({"optimizer": name}, Regressor(), lr_scheduler="linear")


def test_schedule_free_warns_that_lr_warmup_steps_does_nothing(caplog):
    _build({"optimizer": "adamw_schedulefree", "lr_warmup_steps": 10}, Regressor())
    assert "lr_warmup_steps=10 does nothing" in caplog.text


@pytest.mark.parametrize(
    "name", ["adamw_schedulefree", "sgd_schedulefree", "pytorch_optimizer.ScheduleFreeAdamW"]
)
def test_fused_back_pass_refuses_schedule_free(name):
    with pytest.raises(ConfigError, match="schedule-free.*fused_back_pass: false"):
        check_fused_backward(optimizer_names=[name])


@pytest.mark.parametrize("name", sorted(SCHEDULE_FREE))
def test_eval_weights_are_the_optimizers_own_and_training_continues_bitwise(name):
    base = {"optimizer": name, "weight_decay": 0.0, **SCHEDULE_FREE[name]}

    def trained():  # three identical runs (deterministic on CPU; optimizers do not deepcopy whole)
        torch.manual_seed(0)
        model = Regressor()
        opt_set = _build(base, model)
        _steps(model, opt_set, 8)  # RAdam's first steps (rho_t <= 4) leave the weights alone
        return model, opt_set

    model, opt_set = trained()
    untouched_model, untouched_set = trained()  # never switched to eval
    own_model, own_set = trained()
    own_set.components["unet"].optimizer.eval()  # the optimizer's own eval weights
    train_weights = _params(model)

    with eval_weights(opt_set):
        assert not opt_set.components["unet"].optimizer.param_groups[0]["train_mode"]
        _assert_equal(_params(model), _params(own_model))
        assert not torch.equal(model.fc1.weight, train_weights[0])  # eval and train weights differ
        saved = copy.deepcopy(opt_set.state_dict())  # what a checkpoint taken now holds
        eval_state = {k: v.clone() for k, v in model.state_dict().items()}  # the pipeline's weights
    assert opt_set.components["unet"].optimizer.param_groups[0]["train_mode"]
    _assert_equal(_params(model), train_weights)

    # Resume: a model loaded from the checkpoint's (eval) pipeline weights, then the training state.
    resumed = Regressor()
    resumed.load_state_dict(eval_state)
    resumed_set = _build(base, resumed)
    resumed_set.load_state_dict(saved)
    _assert_equal(_params(resumed), train_weights)

    for m, s in ((model, opt_set), (untouched_model, untouched_set), (resumed, resumed_set)):
        _steps(m, s, 3)
    _assert_equal(_params(model), _params(untouched_model))
    _assert_equal(_params(resumed), _params(untouched_model))


def test_schedule_free_state_without_train_weights_is_refused():
    model = Regressor()
    opt_set = _build({"optimizer": "adamw_schedulefree", "lr": 1e-2}, model)
    _steps(model, opt_set, 2)
    state = opt_set.state_dict()
    del state["components"]["unet"]["schedule_free_train_weights"]
    with pytest.raises(CheckpointError, match="no train-mode weights"):
        _build({"optimizer": "adamw_schedulefree", "lr": 1e-2}, Regressor()).load_state_dict(state)


def test_eval_weights_is_a_no_op_for_other_optimizers():
    model = Regressor()
    opt_set = _build({"optimizer": "adamw", "lr": 1e-2}, model)
    _steps(model, opt_set, 2)
    before = _params(model)
    with eval_weights(opt_set):
        _assert_equal(_params(model), before)
    assert "schedule_free_train_weights" not in opt_set.state_dict()["components"]["unet"]


def test_prodigy_schedulefree_logs_d_times_lr():
    model = Regressor()
    opt_set = _build({"optimizer": "prodigy_schedulefree", "lr": 0.5, "d0": 1e-4}, model)
    _steps(model, opt_set, 10)
    group = opt_set.components["unet"].optimizer.param_groups[0]
    assert group["d"] > 1e-4  # d grew
    assert opt_set.learning_rates()["unet"] == group["d"] * 0.5
    assert opt_set.nominal_learning_rates()["unet"] == 0.5


# Each tiny-model run trains the UNet with one new optimizer and the text encoder with another.
RESUME_CASES = {
    "adamw_sf+came": ({"optimizer": "adamw_schedulefree", "lr": 2e-4}, {"optimizer": "came", "lr": 1e-4}),
    "prodigy_sf+adopt": (
        {"optimizer": "prodigy_schedulefree", "lr": 1.0},
        {"optimizer": "adopt", "lr": 1e-4},
    ),
    "sgd_sf+radam_sf": (
        {"optimizer": "sgd_schedulefree", "lr": 1e-3},
        {"optimizer": "radam_schedulefree", "lr": 1e-4},
    ),
}
# 8 images, batch 4: 2 optimizer steps per epoch, 2 epochs, a save after epoch 0; stop at step 1.
RUN = dict(max_epochs=2, batch_size=4, lr=None, save_every_n_epochs=1, resolution=64)


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_tiny_model_resume_is_bitwise_and_checkpoints_hold_eval_weights(tmp_path, monkeypatch, case):
    from trainer.eval.sampling import SampleGenerator
    from trainer.eval.validation import Validator

    seen = {}  # (what, step) -> the UNet weights samples / validation were given

    def recording(method, what, unet_of, step_arg):
        def wrapper(self, *args, **kwargs):
            seen[(what, args[step_arg])] = {k: v.clone() for k, v in unet_of(self, args).state_dict().items()}
            return method(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        SampleGenerator, "generate", recording(SampleGenerator.generate, "sample", lambda s, a: a[0].unet, 1)
    )
    monkeypatch.setattr(Validator, "run", recording(Validator.run, "val", lambda s, a: s.step_fn.unet, 0))
    val_folder = copy_images(tmp_path / "val", 4)
    val_cfg = tmp_path / "val.json"
    val_cfg.write_text(json.dumps({"val_split_mode": "manual", "manual_data_root": val_folder}))
    unet, te = RESUME_CASES[case]
    opt = tmp_path / "optimizer.json"
    opt.write_text(json.dumps({"base": unet, "text_encoder_overrides": te}))
    run = {**RUN, "optimizer_config": str(opt), "data_root": copy_images(tmp_path / "data", 8)}
    samples = tmp_path / "samples.json"
    prompt = {"prompt": "a red circle", "size": [64, 64]}
    samples.write_text(json.dumps({"num_inference_steps": 2, "samples": [prompt]}))

    # The straight run samples every step and saves mid-run: neither may change the trajectory.
    straight, s_session = train_in_process(
        tmp_path,
        project_name="straight",
        sample_prompts=str(samples),
        sample_steps=1,
        validation_config=str(val_cfg),
        **run,
    )
    assert straight.status == "finished" and straight.global_step == 4
    assert list(s_session.run.samples.glob("*.png"))
    first, _ = train_in_process(tmp_path, project_name="resumed", stop_at_step=1, **run)
    assert first.global_step == 1
    second, r_session = train_in_process(tmp_path, project_name="resumed", resume_ckpt="findlast", **run)
    assert second.status == "finished" and second.global_step == 4 and r_session.resumed_from is not None

    final = pipeline_weights(checkpoint_dirs(s_session.run.path)[-1])
    assert_bitwise_equal(final, pipeline_weights(checkpoint_dirs(r_session.run.path)[-1]))

    # The checkpoint holds the optimizer's own eval-mode weights, not the train-mode ones.
    comp = s_session.optim.components["unet"]
    if comp.spec.schedule_free:
        live = {n: p.detach().clone() for n, p in zip(comp.param_names, comp.params, strict=True)}
        comp.optimizer.eval()
        evaluated = {
            f"unet/{n}": p.detach().clone() for n, p in zip(comp.param_names, comp.params, strict=True)
        }
        comp.optimizer.train()
        assert_bitwise_equal(evaluated, {k: final[k] for k in evaluated})
        assert any(not torch.equal(live[k[len("unet/") :]], v) for k, v in evaluated.items())
        # Samples and validation after the last step saw those eval weights too.
        for what in ("sample", "val"):
            assert_bitwise_equal({f"unet/{k}": v for k, v in seen[(what, 4)].items()}, evaluated)
