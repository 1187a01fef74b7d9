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


def tiny_clip(num_layers: int = 4):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


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
