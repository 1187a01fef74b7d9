"""Sampling and validation run a compiled UNet eagerly: the training graph never recompiles."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from trainer.eval.observe import Observers


@dataclass
class Components:  # the two fields of SDComponents the observers swap
    unet: torch.nn.Module
    text_encoder: torch.nn.Module


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x * self.w).relu()


def _compiled(counter: list) -> torch.nn.Module:
    def backend(gm, example_inputs):
        counter.append(1)
        return gm.forward

    module = Tiny()
    module.compile(backend=backend)
    return module


def test_validation_and_sampling_do_not_recompile_the_training_graph():
    compiles = []
    unet = _compiled(compiles)
    x = torch.randn(2, 4)
    unet(x).sum().backward()  # the training graph
    assert len(compiles) == 1

    class Validator:
        enabled = True

        def run(self, step, metrics):
            with torch.no_grad():  # what Validator.run does
                unet(torch.randn(3, 4))
            return {"val": 0.0}

    class Sampler:
        def generate(self, components, step, metrics, ema=None):
            with torch.no_grad():
                components.unet(torch.randn(6, 4))
            return []

    accelerator = SimpleNamespace(unwrap_model=lambda m: m, is_main_process=True, device=torch.device("cpu"))
    observers = Observers(
        model=Components(unet=unet, text_encoder=torch.nn.Linear(1, 1)),
        accelerator=accelerator,
        state=SimpleNamespace(global_step=1),
        metrics=None,
        ema=None,
        optim=None,  # not schedule-free: eval_weights is a no-op
        sampler=Sampler(),
        validator=Validator(),
    )
    observers._validate()
    observers._sample()
    unet(x).sum().backward()
    assert len(compiles) == 1  # no graph for no_grad / new batch sizes, training graph reused
    assert unet._compiled_call_impl is not None
