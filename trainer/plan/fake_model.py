"""The run's model and optimizers, built without weights: real modules on shadow tensors.

`build_fake_run` does what `trainer.parts.builder.build_components` does to the model, with the
trainer's own functions, on modules whose parameters are shadows (shadow.py: CPU tensors with
no data): the attention kernels and lean forwards, the freezing and optimizers
(`build_optimizers`, so what trains is decided by the same rules), the storage dtype of each
module (`plan_dtypes`) and gradient checkpointing. channels_last changes strides, not bytes, and
is left out. Shadows are CPU tensors, so CPU autocast applies to them: the planning pass casts
exactly as a real autocast step does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from trainer.config import TrainConfig
from trainer.models.components import ComponentConfigs, load_tokenizer, training_scheduler_config
from trainer.optim import OptimizerFile, OptimizerSet, TrainOptimSettings, build_optimizers
from trainer.parts.attention import configure_attention
from trainer.parts.builder import enable_gradient_checkpointing
from trainer.parts.lean_blocks import use_lean_blocks
from trainer.parts.placement import WEIGHT_DTYPES, plan_dtypes
from trainer.plan.emulation import use_cuda_autocast_norms
from trainer.plan.shadow import shadow_module

log = logging.getLogger(__name__)


@dataclass
class FakeRun:
    """Shadow modules placed as the run places them, and their optimizers."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: object
    scheduler_config: dict
    optim: OptimizerSet
    trained: tuple[str, ...]
    dtypes: dict[str, torch.dtype]


def optim_settings(cfg: TrainConfig) -> TrainOptimSettings:
    """The train.json side of the optimizer precedence, as `trainer.parts.builder` passes it."""
    return TrainOptimSettings.from_config(cfg)


def build_fake_run(
    arch: ComponentConfigs,
    cfg: TrainConfig,
    opt_file: OptimizerFile,
    *,
    device: str,
    autocast_dtype: torch.dtype | None,
) -> FakeRun:
    """Build and place the model of `arch` for `cfg` on fake tensors (see the module docstring).
    `device` ("cuda" or "cpu") decides the frozen modules' dtype as `plan_dtypes` does."""
    trained = trained_components(cfg)
    dtypes = plan_dtypes(trained, torch.device(device), autocast_dtype, WEIGHT_DTYPES[cfg.weight_dtype])
    unet, vae, text_encoder = _instantiate(arch, dtypes)
    unet, vae, text_encoder = shadow_module(unet), shadow_module(vae), shadow_module(text_encoder)
    if cfg.attn_type != "xformers":  # xformers needs CUDA to install; its kernel keeps what SDPA's does
        configure_attention(unet, text_encoder, cfg.attn_type, device=torch.device("cpu"))
    use_lean_blocks(unet, vae)
    if device == "cuda":
        use_cuda_autocast_norms(unet, vae, text_encoder)
    vae.eval()
    unet.train()
    text_encoder.train("text_encoder" in trained)
    vae.requires_grad_(False)
    optim = build_optimizers(
        opt_file, optim_settings(cfg), unet=unet, text_encoder=text_encoder, total_optimizer_steps=1
    )
    assert tuple(optim.components) == trained, (optim.components, trained)
    family_tokenizer = _tokenizer(arch.tokenizer)
    run = FakeRun(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=family_tokenizer,
        scheduler_config=training_scheduler_config(arch.scheduler, cfg.prediction_type),
        optim=optim,
        trained=trained,
        dtypes=dtypes,
    )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(run, trained)
    return run


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(config: dict):
    """The family's tokenizer, loaded once per process (the step only reads it; re-plans for
    the advice would otherwise load it again for each change)."""
    key = json.dumps(config, sort_keys=True)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(config)
    return _TOKENIZERS[key]


def trained_components(cfg: TrainConfig) -> tuple[str, ...]:
    """What the optimizers will train (`build_optimizers` builds one per component not disabled;
    asserted against it after the build)."""
    return tuple(
        name
        for name, disabled in (
            ("unet", cfg.disable_unet_training),
            ("text_encoder", cfg.disable_textenc_training),
        )
        if not disabled
    )


def _instantiate(
    arch: ComponentConfigs, dtypes: dict[str, torch.dtype]
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """`ComponentConfigs.instantiate` on the meta device, each module created in its placed
    dtype (a shadow cannot be converted after construction: `nn.Module.to` would swap it)."""
    te_config = CLIPTextConfig(**{k: v for k, v in arch.text_encoder.items() if k != "architectures"})
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(arch.unet),
        "vae": lambda: AutoencoderKL.from_config(arch.vae),
        "text_encoder": lambda: CLIPTextModel(te_config),
    }
    built: dict[str, Any] = {}
    default = torch.get_default_dtype()
    for name, build in builders.items():
        torch.set_default_dtype(dtypes[name])
        try:
            with torch.device("meta"):
                built[name] = build()
        finally:
            torch.set_default_dtype(default)
    return built["unet"], built["vae"], built["text_encoder"]


def arch_key(arch: ComponentConfigs) -> str:
    """A hashable identity of an architecture (its configs), for memoising planning passes."""
    return json.dumps([arch.unet, arch.vae, arch.text_encoder], sort_keys=True)


def tensor_bytes(tensors) -> int:
    """Bytes of tensors that own their storage (parameters, buffers, states), each once."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return tensor_bytes([*module.parameters(), *module.buffers()])
