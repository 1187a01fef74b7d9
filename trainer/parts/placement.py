"""Where each model lives and in which dtype, and exports in the precision the model came in.

One dtype per module, so its forward needs no casts between layers: a module with anything
trainable is stored in `weight_dtype` (fp32 unless `weight_dtype: "bf16"` asks otherwise, so the
optimizer steps fp32 master weights; a partly frozen text encoder is therefore fp32 as a whole,
or bf16 as a whole); a module with nothing trainable (the VAE, a frozen text encoder or UNet)
goes to the autocast dtype on CUDA, where fp32 copies would only cost memory, and stays fp32 on
CPU (half-precision CPU kernels are slow or missing).

Frozen parameters never change, so rounding them to bf16/fp16 for the forward must not leak into
what is saved: `ExportPrecision` keeps their loaded values (host memory, no GPU memory) and
`restored()` shows them to the savers, so the pipeline folder and the full-precision single file
hold the frozen weights exactly as loaded, and a resume starts from them, not from rounded ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODULES = ("vae", "text_encoder", "unet")


def _halves_frozen(device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """Frozen modules go to the autocast dtype only on CUDA."""
    return device.type == "cuda" and autocast_dtype is not None


def plan_dtypes(
    trained: tuple[str, ...],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    weight_dtype: torch.dtype,
) -> dict[str, torch.dtype]:
    """The storage dtype of each module (see the module docstring for the rule); `trained` names
    the modules the optimizers update."""
    frozen = torch.float32
    if autocast_dtype is not None and _halves_frozen(device, autocast_dtype):
        frozen = autocast_dtype
    return {name: weight_dtype if name in trained else frozen for name in MODULES}


@dataclass
class ExportPrecision:
    """Loaded values of the frozen parameters that placement stored in a lower precision."""

    originals: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> name -> tensor

    @contextmanager
    def restored(self, components) -> Iterator[None]:
        """Inside the block the frozen parameters hold their loaded values (on the host, where they
        are kept: savers read state dicts, no forward runs). Trained parameters are untouched: they
        keep their identity and dtype (retyping them would detach DDP's gradient hooks)."""
        swapped = []
        with torch.no_grad():
            for module_name, tensors in self.originals.items():
                module = getattr(components, module_name)
                for name, original in tensors.items():
                    param = module.get_parameter(name)
                    swapped.append((param, param.data))
                    param.data = original
        try:
            yield
        finally:
            with torch.no_grad():
                for param, data in swapped:
                    param.data = data


def place_models(
    model,
    device: torch.device,
    autocast_dtype,
    *,
    trained: tuple[str, ...],
    weight_dtype: torch.dtype = torch.float32,
) -> ExportPrecision:
    """Move models to the device (after freezing) in the dtypes of `plan_dtypes`. Parameters keep
    their identity, so optimizers built before this still hold them. Returns the loaded values
    of every frozen parameter stored below its loaded precision, for exports."""
    plan = plan_dtypes(trained, device, autocast_dtype, weight_dtype)
    keep = ExportPrecision()
    for name in MODULES:
        module: nn.Module = getattr(model, name)
        lowered = {
            n: p.detach().to("cpu", copy=True) if p.device.type != "cpu" else p.detach()
            for n, p in module.named_parameters()
            if not p.requires_grad and p.is_floating_point() and p.element_size() > plan[name].itemsize
        }
        if lowered:
            keep.originals[name] = lowered
        module.to(device)
        if plan[name] != torch.float32:
            # nn.Module.to: diffusers' override warns about fp32-only modules, which SD models lack.
            nn.Module.to(module, dtype=plan[name])
    # The VAE is only ever run without gradients (encode, sample decode): stored channels_last,
    # its convolutions take oneDNN's NHWC kernels, a quarter faster on CPU (measured,
    # docs/PERFORMANCE.md "Second pass"). encode_latents hands the UNet contiguous latents.
    model.vae.to(memory_format=torch.channels_last)
    model.vae.eval()
    model.unet.train()
    model.text_encoder.train("text_encoder" in trained)
    return keep
