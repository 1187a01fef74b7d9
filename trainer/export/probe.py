"""How close base + LoRA comes to the fine-tune where it matters: the UNet's prediction.

Kept energy says how much of the weight change a rank carries; it does not say how much the
lost part matters to what the model predicts. The probe runs three models on the same fixed
latents, timesteps and prompts (text encoder and UNet, each model with its own): the base, the
tuned model, and the base with the LoRA applied the way kohya's and A1111's loaders apply it
at run time (each covered layer adds scale * up(down(x)) to its output). The error is

    ||pred(base + LoRA) - pred(tuned)|| / ||pred(base) - pred(tuned)||

0 is the fine-tune itself, 1 no better than the base. The LoRA tensors given are the ones
written to the file (rounded to its precision), so the number describes the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.export.naming import LoraTarget

PROBE_PROMPTS = (
    "a photo of a red circle on a blue background",
    "a portrait of a woman, oil painting",
    "a city street at night in the rain",
    "a green triangle and a yellow square",
)
PROBE_TIMESTEPS = (100, 400, 700, 950)
MAX_PROBE_LATENT = 32  # latent side (256 px for SD): the error is relative, the cost quadratic


@dataclass(frozen=True)
class Probe:
    """The fixed inputs: one prompt per timestep, latents from `seed`."""

    prompts: tuple[str, ...] = PROBE_PROMPTS
    timesteps: tuple[int, ...] = PROBE_TIMESTEPS
    latent_size: int | None = None  # None: the UNet's sample_size, at most MAX_PROBE_LATENT
    seed: int = 0

    def __post_init__(self):
        if len(self.prompts) != len(self.timesteps):
            raise ValueError("a probe pairs each prompt with one timestep: give as many of each")


@dataclass(frozen=True)
class PredictionError:
    relative: float  # ||lora - tuned|| / ||base - tuned||; nan when base and tuned predict alike
    lora_rms: float  # RMS of pred(base + LoRA) - pred(tuned)
    base_rms: float  # RMS of pred(base) - pred(tuned)
    samples: int
    latent_size: int


class _LoraHook:
    """Forward hook adding scale * up(down(x)) to a Linear's or Conv2d's output."""

    def __init__(self, module: torch.nn.Module, up: torch.Tensor, down: torch.Tensor, scale: float):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)  # a Linear's or Conv2d's
        self.up = up.to(device=weight.device, dtype=weight.dtype)
        self.down = down.to(device=weight.device, dtype=weight.dtype)
        self.scale = scale

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if isinstance(module, torch.nn.Conv2d):
            h = F.conv2d(x, self.down, None, module.stride, module.padding, module.dilation, module.groups)
            return output + self.scale * F.conv2d(h, self.up)
        return output + self.scale * F.linear(F.linear(x, self.down), self.up)


@contextmanager
def lora_applied(model, tensors: dict[str, torch.Tensor], targets: list[LoraTarget]) -> Iterator[None]:
    """Within the block, `model`'s covered layers run with the LoRA added (no weight changes)."""
    modules = {c: dict(getattr(model, c).named_modules()) for c in {t.component for t in targets}}
    handles = []
    try:
        for t in targets:
            module = modules[t.component][t.module]
            down = tensors[f"{t.lora_name}.lora_down.weight"]
            scale = float(tensors[f"{t.lora_name}.alpha"]) / down.shape[0]
            hook = _LoraHook(module, tensors[f"{t.lora_name}.lora_up.weight"], down, scale)
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def probe_latent_size(unet, probe: Probe) -> int:
    return probe.latent_size or min(int(unet.config.sample_size), MAX_PROBE_LATENT)


@torch.no_grad()
def predict(model, probe: Probe, latent_size: int) -> torch.Tensor:
    """The UNet's output for the probe, fp32 on the CPU (each model on its own device/dtype)."""
    weight = next(model.unet.parameters())
    te_weight = next(model.text_encoder.parameters())
    ids = model.tokenizer(
        list(probe.prompts),
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(te_weight.device)
    states = model.text_encoder(ids)[0].to(device=weight.device, dtype=weight.dtype)
    generator = torch.Generator().manual_seed(probe.seed)
    shape = (len(probe.prompts), model.unet.config.in_channels, latent_size, latent_size)
    latents = torch.randn(shape, generator=generator).to(device=weight.device, dtype=weight.dtype)
    timesteps = torch.tensor(probe.timesteps, device=weight.device)
    return model.unet(latents, timesteps, encoder_hidden_states=states).sample.float().cpu()


def prediction_error(
    base, tuned, tensors: dict[str, torch.Tensor], targets: list[LoraTarget], probe: Probe | None = None
) -> PredictionError:
    """Measure the relative prediction error of base + LoRA against `tuned` (module docstring)."""
    probe = probe or Probe()
    size = probe_latent_size(base.unet, probe)
    want = predict(tuned, probe, size)
    plain = predict(base, probe, size)
    with lora_applied(base, tensors, targets):
        merged = predict(base, probe, size)
    base_gap = float((plain - want).double().norm())
    lora_gap = float((merged - want).double().norm())
    count = want.numel() ** 0.5
    return PredictionError(
        relative=lora_gap / base_gap if base_gap > 0 else float("nan"),  # the report says why
        lora_rms=lora_gap / count,
        base_rms=base_gap / count,
        samples=len(probe.prompts),
        latent_size=size,
    )
