"""Precision choices that depend on the GPU, checked on CPU with an emulated device (issue 32
item 7): refused with the keys to change, before the model loads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from tests.test_cuda_emulated import _fake_gpu
from trainer.config import TrainConfig
from trainer.optim import parse_optimizer_json
from trainer.parts import builder
from trainer.runtime.errors import ConfigError


class _ModelLoaded(Exception):
    """Raised by the stand-in for load_model: the build got past its precision checks."""


def _build_on_fake_gpu(monkeypatch, major: int, **config):
    _fake_gpu(monkeypatch, major)

    def load_model(*args, **kwargs):
        raise _ModelLoaded

    monkeypatch.setattr(builder, "load_model", load_model)
    cuda_accelerator = SimpleNamespace(
        device=torch.device("cuda"), num_processes=1, process_index=0, prepare_model=Accelerator.prepare_model
    )
    cfg = TrainConfig(resume_ckpt="builtin:tiny-sd1", **config)
    opt_file = parse_optimizer_json(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-5}}), "test")
    builder.build_components(cfg, cuda_accelerator, opt_file=opt_file, total_optimizer_steps=1)


def test_bf16_weights_with_auto_precision_on_a_gpu_without_bf16_refuse_before_loading(monkeypatch):
    """A T4/V100 (compute capability 7): `auto` picks fp16, so bf16 weights were computed in
    fp16 in silence (a GradScaler on bf16 weights, rounding twice)."""
    with pytest.raises(ConfigError) as err:
        _build_on_fake_gpu(monkeypatch, 7, weight_dtype="bf16", mixed_precision="auto")
    message = str(err.value)
    assert "weight_dtype" in message and "mixed_precision" in message and "fp16" in message
    assert "compute capability 7" in message


@pytest.mark.parametrize(
    ("major", "config"),
    [
        (8, {"weight_dtype": "bf16", "mixed_precision": "auto"}),  # native bf16: auto is bf16
        (7, {"weight_dtype": "fp32", "mixed_precision": "auto"}),  # fp32 weights, fp16 autocast: fine
        (7, {"weight_dtype": "bf16", "mixed_precision": "bf16"}),  # asked for explicitly (emulated)
    ],
)
def test_consistent_precision_choices_go_on_to_load_the_model(monkeypatch, major, config):
    with pytest.raises(_ModelLoaded):
        _build_on_fake_gpu(monkeypatch, major, **config)
