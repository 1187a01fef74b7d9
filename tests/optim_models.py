"""Tiny models and helpers shared by the tests/test_optim_*.py files (no tests here)."""

from __future__ import annotations

import copy
import json
import logging

import torch
from torch import nn

from trainer.optim import OptimizerSet, TrainOptimSettings, build_optimizers, parse_optimizer_json

# Keep transformers quiet about the tiny vocabulary's bos/eos ids.
logging.getLogger("transformers").setLevel(logging.ERROR)


class Regressor(nn.Module):
    """A small fitting problem; the first weight has 5120 >= 4096 elements, so 8-bit optimizers
    keep uint8 state for it (bitsandbytes' default min_8bit_size)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 80)
        self.fc2 = nn.Linear(80, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def regression_data(seed: int = 0, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2]
    return x, y


def build_from_json(
    config: dict, *, unet: nn.Module, text_encoder: nn.Module, steps: int = 100, **settings
) -> OptimizerSet:
    opt_file = parse_optimizer_json(json.dumps(config), "test.json")
    return build_optimizers(
        opt_file,
        TrainOptimSettings(**settings),
        unet=unet,
        text_encoder=text_encoder,
        total_optimizer_steps=steps,
    )


def clone(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)
