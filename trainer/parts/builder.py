"""Build the parts of a training run from its config: model, data, step, optimizers, EMA, scaler.

`build_components` is pure construction: it loads the model and the dataset and wires them
together, but creates no run folder, writes nothing of its own (the dataset scan keeps its
cache under logdir) and knows nothing about resuming (the session does those). The trained
components are decided once, by the optimizer build (which applies `disable_*_training` and the
text-encoder freezing), and that decision (`trained`) is passed to everything that depends on it
(placement, gradient checkpointing, DDP, EMA) instead of being guessed again from `requires_grad`. The session and `bench/step.py` both build through here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from diffusers.models import UNet2DConditionModel
from transformers import PreTrainedModel

from trainer.checkpointing.state import seed_everything
from trainer.config import TrainConfig
from trainer.data import DataSettings, LoadedDataset, load_data
from trainer.data.latent_cache import vae_fingerprint
from trainer.models import SDComponents, load_model
from trainer.optim import (
    FusedOptimizerSet,
    OptimizerFile,
    OptimizerSet,
    TrainingOptimizer,
    TrainOptimSettings,
    build_optimizers,
    check_text_encoder_lr_scale,
    load_optimizer_file,
)
from trainer.optim.stochastic_rounding import StochasticRounding, rounding_seed
from trainer.parts.attention import configure_attention
from trainer.parts.ema import EMA, ema_decay_for_run
from trainer.parts.lean_blocks import use_lean_blocks
from trainer.parts.param_layout import keep_parameter_layouts
from trainer.parts.placement import WEIGHT_DTYPES, ExportPrecision, place_models
from trainer.parts.precision import configure_cuda_backends, make_grad_scaler, resolve_autocast_dtype
from trainer.step.diffusion import NoiseSchedule
from trainer.step.text_cache import TextEmbeddingCache, text_encoder_fingerprint
from trainer.step.training_step import StepSettings, TrainingStep

log = logging.getLogger(__name__)


@dataclass
class Components:
    """The built parts of a run. `trained` names the components the optimizers update."""

    opt_file: OptimizerFile
    model: SDComponents
    data: LoadedDataset | None  # None when built for synthetic batches (`total_optimizer_steps` given)
    step: TrainingStep
    optim: TrainingOptimizer
    scaler: torch.amp.GradScaler | None
    ema: EMA | None
    total_optimizer_steps: int
    trained: tuple[str, ...]
    wrapped: dict[str, torch.nn.Module]  # trained modules as prepared by accelerate (DDP)
    export_precision: ExportPrecision | None  # loaded values of frozen weights stored in half precision
    autocast_dtype: torch.dtype | None
    vae_fingerprint: str | None  # the VAE's identity for the latent cache (with cache_latents)
    cuda_modes: str = ""  # for the start-up line


def build_components(
    cfg: TrainConfig,
    accelerator: Accelerator,
    *,
    model_spec: str | None = None,
    opt_file: OptimizerFile | None = None,
    total_optimizer_steps: int | None = None,
) -> Components:
    """Load and wire everything `cfg` describes, in the order exact resume depends on.

    `model_spec` replaces `cfg.resume_ckpt` as the weights to load (a checkpoint's pipeline
    folder when resuming); `opt_file` replaces reading `cfg.optimizer_config` (benchmarks build
    one in memory). With `total_optimizer_steps` given, no dataset is loaded
    (`data` is None): benchmarks feed synthetic batches; otherwise the run's length is the
    dataset's windows per epoch x `max_epochs`.
    """
    seed_everything(cfg.seed)
    opt_file = opt_file or load_optimizer_file(cfg.optimizer_config)
    check_text_encoder_lr_scale(opt_file, cfg.lr, text_encoder_trains=not cfg.disable_textenc_training)
    device = accelerator.device
    # Before the model loads: the GPU decides what `auto` means, and may refuse the weight dtype.
    autocast_dtype = resolve_autocast_dtype(
        cfg.mixed_precision, cfg.disable_amp, device, weight_dtype=cfg.weight_dtype
    )
    model = load_model(
        model_spec or cfg.resume_ckpt,
        vae=cfg.vae,
        prediction_type=cfg.prediction_type,
        zero_terminal_snr=cfg.enable_zero_terminal_snr,
    )
    log.info("model: %s (%s)", model.source, model.family)
    configure_attention(model.unet, model.text_encoder, cfg.attn_type, device=device)  # logs it
    use_lean_blocks(model.unet, model.vae)  # exact; logs what it covers
    data = None
    if total_optimizer_steps is None:
        data = load_data(
            DataSettings.from_config(
                cfg, num_replicas=accelerator.num_processes, rank=accelerator.process_index
            )
        )
        total_optimizer_steps = data.windows_per_epoch() * cfg.max_epochs
    # `deterministic` needs cuDNN autotuning off (configure_determinism already turned it off).
    cuda_modes = configure_cuda_backends(device, allow_tf32=cfg.allow_tf32, benchmark=not cfg.deterministic)
    scaler = make_grad_scaler(autocast_dtype, device)
    rounding = make_rounding(cfg.weight_dtype, device, seed=cfg.seed)
    optim = _build_optim(cfg, opt_file, model, total_optimizer_steps, rounding)
    trained = tuple(optim.components)
    ema_decay = _ema_decay(cfg, total_optimizer_steps)  # refuses an EMA that would never update
    training_optim = wrap_optimizer_set(
        optim,
        fused_back_pass=cfg.fused_back_pass,
        uses_grad_scaler=scaler is not None,
        world_size=accelerator.num_processes,
        channels_last=cfg.channels_last,
    )
    if data is not None:
        log.info("%s", data.summary())
    log.info("optimizer settings (%s):\n%s", opt_file.source, training_optim.summary_table())

    export_precision, vae_id, wrapped = _place(cfg, model, accelerator, autocast_dtype, trained)
    step = _training_step(cfg, model, wrapped, device, autocast_dtype)
    return Components(
        opt_file=opt_file,
        model=model,
        data=data,
        step=step,
        optim=training_optim,
        scaler=scaler,
        ema=_build_ema(cfg, model, ema_decay, trained),
        total_optimizer_steps=total_optimizer_steps,
        trained=trained,
        wrapped=wrapped,
        export_precision=export_precision,
        autocast_dtype=autocast_dtype,
        vae_fingerprint=vae_id,
        cuda_modes=cuda_modes,
    )


def _training_step(
    cfg: TrainConfig,
    model: SDComponents,
    wrapped: dict[str, torch.nn.Module],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> TrainingStep:
    """The step on the trained modules as accelerate prepared them (DDP when distributed)."""
    schedule = NoiseSchedule.from_scheduler_config(
        model.scheduler_config,
        zero_terminal_snr=cfg.enable_zero_terminal_snr,
        prediction_type=cfg.prediction_type,
    )
    return TrainingStep(
        unet=wrapped.get("unet", model.unet),
        text_encoder=wrapped.get("text_encoder", model.text_encoder),
        vae=model.vae,
        tokenizer=model.tokenizer,
        schedule=schedule,
        settings=StepSettings.from_config(cfg),
        device=device,
        autocast_dtype=autocast_dtype,
        text_cache=_text_cache(cfg, model),
        channels_last=cfg.channels_last,
    )


def _place(
    cfg: TrainConfig,
    model: SDComponents,
    accelerator: Accelerator,
    autocast_dtype: torch.dtype | None,
    trained: tuple[str, ...],
) -> tuple[ExportPrecision | None, str | None, dict[str, torch.nn.Module]]:
    """Devices and dtypes, memory format, activation checkpointing, compile and DDP, in that
    order. Returns the export precision of half-precision frozen weights, the VAE's fingerprint
    for the latent cache (read while its weights are still the loaded ones) and the trained
    modules as accelerate prepared them."""
    vae_state = model.vae.state_dict() if cfg.cache_latents else None
    export_precision = place_models(
        model,
        accelerator.device,
        autocast_dtype,
        trained=trained,
        weight_dtype=WEIGHT_DTYPES[cfg.weight_dtype],
    )
    vae_id = vae_fingerprint(vae_state, model.vae.dtype) if vae_state is not None else None
    del vae_state  # the fingerprint is all the cache needs of the pre-placement weights
    if cfg.channels_last:
        # diffusers wraps `ModelMixin.to` with functools.wraps, which mypy reads as unbound.
        model.unet.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, trained)
    if cfg.compile:
        compile_unet(model.unet, backend=cfg.compile_backend, mode=cfg.compile_mode)
    return export_precision, vae_id, _prepare_for_ddp(accelerator, model, trained)


def evaluation_step(components: Components, accelerator: Accelerator) -> TrainingStep:
    """The training step on the unwrapped modules without embedding perturbation: validation
    runs no DDP collectives, so ranks never wait on each other."""
    model, step = components.model, components.step
    return TrainingStep(
        unet=accelerator.unwrap_model(model.unet),
        text_encoder=accelerator.unwrap_model(model.text_encoder),
        vae=model.vae,
        tokenizer=model.tokenizer,
        schedule=step.schedule,
        settings=replace(step.settings, embedding_perturbation=0.0, ip_noise_gamma=0.0),
        device=step.device,
        autocast_dtype=components.autocast_dtype,
        text_cache=step.text_cache,  # outputs depend only on the caption: safe to share
    )


def _build_optim(
    cfg: TrainConfig,
    opt_file: OptimizerFile,
    model: SDComponents,
    total: int,
    rounding: StochasticRounding | None,
) -> OptimizerSet:
    settings = TrainOptimSettings.from_config(cfg)
    model.vae.requires_grad_(False)
    return build_optimizers(
        opt_file,
        settings,
        unet=model.unet,
        text_encoder=model.text_encoder,
        total_optimizer_steps=total,
        rounding=rounding,
    )


def compile_unet(unet: torch.nn.Module, *, backend: str, mode: str) -> None:
    """`torch.compile` the UNet in place (`module.compile()`), so state_dict keys, saving, EMA and
    DDP see the same module. Works with gradient checkpointing (diffusers uses the non-reentrant
    variant, which dynamo traces). Each new input shape (aspect bucket, short last batch)
    recompiles once; after the second, dynamic shapes are used."""
    unet.compile(backend=backend, mode=None if mode == "default" else mode)
    log.info("torch.compile: UNet with backend %s, mode %s (first steps compile)", backend, mode)


def make_rounding(weight_dtype: str, device: torch.device, *, seed: int) -> StochasticRounding | None:
    """bf16 stochastic rounding for `weight_dtype` "bf16", else None. `seed` is the run seed, the
    same on every rank: all replicas round an identical all-reduced update with identical bits."""
    if weight_dtype != "bf16":
        return None
    return StochasticRounding(device, seed=rounding_seed(seed))


def wrap_optimizer_set(
    optim: OptimizerSet,
    *,
    fused_back_pass: bool,
    uses_grad_scaler: bool,
    world_size: int = 1,
    channels_last: bool = False,
) -> TrainingOptimizer:
    """The fused back pass around a built OptimizerSet (ConfigError when it is impossible:
    fused_backward.py). With `channels_last`, every optimizer keeps its parameters' layout and
    storage across steps (trainer/parts/param_layout.py)."""
    wrapped: TrainingOptimizer = optim
    if fused_back_pass:
        wrapped = FusedOptimizerSet(optim, uses_grad_scaler=uses_grad_scaler, world_size=world_size)
    if channels_last:
        keep_parameter_layouts(wrapped.torch_optimizers())
    return wrapped


def _text_cache(cfg: TrainConfig, model: SDComponents) -> TextEmbeddingCache | None:
    """In-memory text-encoder output cache (host memory: ~118-236 KB per distinct SD1.5 caption)."""
    if not cfg.cache_text_encoder_outputs:
        return None
    fingerprint = text_encoder_fingerprint(model.text_encoder, model.source)
    return TextEmbeddingCache(
        fingerprint, clip_skip=cfg.clip_skip, max_token_length=cfg.max_token_length, storage_device="cpu"
    )


class CheckpointableModel(Protocol):
    """What `enable_gradient_checkpointing` reads: SDComponents, or the planner's fake run."""

    @property
    def unet(self) -> UNet2DConditionModel: ...

    @property
    def text_encoder(self) -> PreTrainedModel: ...


def enable_gradient_checkpointing(model: CheckpointableModel, trained: tuple[str, ...]) -> None:
    """Activation checkpointing for the UNet, and for the text encoder when it trains.

    Both non-reentrant, said explicitly: diffusers passes `use_reentrant=False` itself, while
    transformers 4.x defaults to the reentrant variant, which gives no gradient to a checkpointed
    layer whose input needs none, so with frozen embeddings (optimizerSD21.json) the trainable
    layers silently stopped learning. transformers 5 renamed the method (the old name warns)."""
    model.unet.enable_gradient_checkpointing()
    if "text_encoder" in trained:
        encoder = model.text_encoder
        enable = (
            getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})  # positional: the keyword's name differs between the two


def _prepare_for_ddp(
    accelerator: Accelerator, model: SDComponents, trained: tuple[str, ...]
) -> dict[str, torch.nn.Module]:
    """Wrap each trained module with accelerate (DDP when distributed; unchanged otherwise).

    Optimizers are built on the unwrapped parameters (the same tensors) and EMA / saving use the
    unwrapped modules, so checkpoints never carry a `module.` prefix.

    DDP gets `gradient_as_bucket_view=True` (accelerate's default leaves it off): each gradient
    is then a view into the bucket DDP all-reduces instead of a second copy of it (+3.7 GiB per
    GPU for SD1.5's fp32 gradients). Nothing here needs separate copies: the optimizers, the
    clipping, the GradScaler and stochastic rounding read and update `p.grad` in place or copy
    it, and `zero_grad(set_to_none=True)` lets DDP hand out the bucket view again next backward.
    A handler the caller gave the accelerator keeps its other settings.
    """
    if accelerator.num_processes > 1:
        handler = accelerator.ddp_handler or DistributedDataParallelKwargs()
        accelerator.ddp_handler = replace(handler, gradient_as_bucket_view=True)
    return {name: accelerator.prepare_model(getattr(model, name), device_placement=False) for name in trained}


def _ema_decay(cfg: TrainConfig, total_steps: int) -> float | None:
    if not cfg.ema_enabled:
        return None
    return ema_decay_for_run(
        decay_rate=cfg.ema_decay_rate,
        strength_target=cfg.ema_strength_target,
        update_interval=cfg.ema_update_interval,
        total_steps=total_steps,
    )


def _build_ema(
    cfg: TrainConfig, model: SDComponents, decay: float | None, trained: tuple[str, ...]
) -> EMA | None:
    """EMA of the UNet (always, as EveryDream2) and of the text encoder when it trains."""
    if decay is None:
        return None
    modules: dict[str, torch.nn.Module] = {"unet": model.unet}
    if "text_encoder" in trained:
        modules["text_encoder"] = model.text_encoder
    device = "cpu" if cfg.ema_device == "cpu" else model.unet.device
    return EMA(modules, decay=decay, update_interval=cfg.ema_update_interval, device=device)
