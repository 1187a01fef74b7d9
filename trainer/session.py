"""Build everything a run needs from its config: the one place that wires components together.

`build_session` resolves the model source (including `findlast` and resuming from a checkpoint
of this trainer), loads the model, data, optimizers, EMA and precision settings, restores the
training state when resuming, and returns a `Session` the loop runs. Nothing here trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from trainer.attention import configure_attention
from trainer.checkpoint import TRAINING_STATE, CheckpointInfo, find_last, load_training_state, read_checkpoint
from trainer.config import TrainConfig, config_to_json
from trainer.data import DataPlan, DataSettings, LatentCache, fill_latent_cache, load_data
from trainer.data.validation_split import load_validation_config
from trainer.diffusion import NoiseSchedule
from trainer.ema import EMA, decay_from_strength_target
from trainer.errors import CheckpointError
from trainer.logging import Metrics
from trainer.models import SDComponents, load_model
from trainer.observe import Observers
from trainer.optim import (
    FusedOptimizerSet,
    OptimizerFile,
    OptimizerSet,
    TrainOptimSettings,
    build_optimizers,
    load_optimizer_file,
)
from trainer.precision import make_grad_scaler, resolve_autocast_dtype
from trainer.run import RunFolder, attach_file_log, new_run_folder, run_folder_of_checkpoint, write_json
from trainer.sampling import SampleGenerator, load_sample_jobs, sample_variants
from trainer.state import TrainingState, capture_global_rng, restore_global_rng, seed_everything
from trainer.step import StepSettings, TrainingStep
from trainer.stochastic_rounding import StochasticRounding
from trainer.text_cache import TextEmbeddingCache, text_encoder_fingerprint
from trainer.threads import describe_threads
from trainer.validation import Validator

log = logging.getLogger(__name__)

PIPELINE_DIR = "pipeline"


@dataclass
class Session:
    """Everything the loop touches. Owned objects expose state_dict()/load_state_dict()."""

    cfg: TrainConfig
    opt_file: OptimizerFile
    accelerator: Accelerator
    run: RunFolder
    model: SDComponents
    data: DataPlan
    step: TrainingStep
    optim: OptimizerSet | FusedOptimizerSet
    scaler: torch.amp.GradScaler | None
    ema: EMA | None
    metrics: Metrics
    state: TrainingState
    total_optimizer_steps: int
    latent_cache: LatentCache | None = None
    resumed_from: Path | None = None
    observers: Observers | None = None
    log_handler: logging.Handler | None = None  # this run's train.log on the root logger
    wrapped: dict[str, torch.nn.Module] | None = None  # trainable modules as prepared by accelerate (DDP)

    def close(self) -> None:
        """Detach this run's train.log from the root logger. Call when the run is over (after
        its summary is logged); otherwise later runs in the same process also write into it."""
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
            self.log_handler.close()
            self.log_handler = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def resume_guard(self) -> dict:
        """Settings that must not change across an exact resume."""
        return {
            "batch_size": self.cfg.batch_size,
            "grad_accum": self.cfg.grad_accum,
            "seed": self.cfg.seed,
            "world_size": self.accelerator.num_processes,
            "data": self.data.fingerprint(),
            "resolution": self.cfg.resolution,
        }

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The trained modules as the step calls them (DDP-wrapped when distributed)."""
        return dict(self.wrapped or {})


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(config_to_json(cfg).encode()).hexdigest()[:16]


def resolve_resume(cfg: TrainConfig) -> tuple[str, CheckpointInfo | None]:
    """Map `resume_ckpt` to a model spec, plus the checkpoint when it is one of ours."""
    spec = cfg.resume_ckpt
    if spec == "findlast":
        info = find_last(Path(cfg.logdir), cfg.project_name)
        log.info("findlast: resuming from %s (step %d)", info.path, info.step)
        return str(info.path / PIPELINE_DIR), info
    path = Path(spec)
    if path.is_dir() and (path / "manifest.json").exists():
        info = read_checkpoint(path)
        return str(path / PIPELINE_DIR), info
    if path.is_dir() and path.name.startswith(".tmp-"):
        raise CheckpointError(f"'{path}' is an incomplete checkpoint (interrupted save); it cannot be loaded")
    return spec, None


def build_session(cfg: TrainConfig, *, accelerator: Accelerator | None = None) -> Session:
    # Precision is ours (mixed_precision key), not accelerate's: it must not autocast a second time.
    accelerator = accelerator or Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    spec, ckpt = resolve_resume(cfg)
    resuming = ckpt is not None and ckpt.resumable
    seed_everything(cfg.seed)
    # Load and validate everything before a run folder exists, so bad input leaves no empty runs.
    opt_file = load_optimizer_file(cfg.optimizer_config)
    model = load_model(spec, vae=cfg.vae, prediction_type=cfg.prediction_type)
    log.info("model: %s (%s)", model.source, model.family)
    attention = configure_attention(model.unet, model.text_encoder, cfg.attn_type, device=accelerator.device)
    data = load_data(_data_settings(cfg, accelerator))
    device = accelerator.device
    autocast_dtype = resolve_autocast_dtype(cfg.mixed_precision, cfg.disable_amp, device)
    scaler = make_grad_scaler(autocast_dtype, device)
    optim, total_steps = _build_optim(cfg, opt_file, model, data)
    optim = wrap_optimizer_set(
        optim,
        weight_dtype=cfg.weight_dtype,
        fused_back_pass=cfg.fused_back_pass,
        uses_grad_scaler=scaler is not None,
        device=device,
        seed=cfg.seed + accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    run = run_folder_of_checkpoint(ckpt.path) if resuming else None
    if run is None:
        run = new_run_folder(cfg.logdir, cfg.project_name) if accelerator.is_main_process else None
        run = _broadcast_run_folder(accelerator, run)
    log_handler = None
    if accelerator.is_main_process:
        log_handler = attach_file_log(run)
        log.info("model: %s (%s)", model.source, model.family)
        log.info("attention: %s", attention)
    log.info("%s", data.summary())
    log.info("optimizer settings (%s):\n%s", opt_file.source, optim.summary_table())

    place_models(model, device, autocast_dtype, weight_dtype=_WEIGHT_DTYPES[cfg.weight_dtype])
    if cfg.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.compile:
        compile_unet(model.unet, backend=cfg.compile_backend, mode=cfg.compile_mode)
    wrapped = _prepare_for_ddp(accelerator, model)
    schedule = NoiseSchedule.from_scheduler_config(
        model.scheduler_config,
        zero_terminal_snr=cfg.enable_zero_terminal_snr,
        prediction_type=cfg.prediction_type,
    )
    step = TrainingStep(
        unet=wrapped.get("unet", model.unet),
        text_encoder=wrapped.get("text_encoder", model.text_encoder),
        vae=model.vae,
        tokenizer=model.tokenizer,
        schedule=schedule,
        settings=_step_settings(cfg),
        device=device,
        autocast_dtype=autocast_dtype,
        text_cache=_text_cache(cfg, model),
        channels_last=cfg.channels_last,
    )
    state = TrainingState()
    state.generator.manual_seed(cfg.seed)
    session = Session(
        cfg=cfg,
        opt_file=opt_file,
        accelerator=accelerator,
        run=run,
        model=model,
        data=data,
        step=step,
        optim=optim,
        scaler=scaler,
        ema=_build_ema(cfg, model, total_steps),
        metrics=None,  # set below, after the resume step is known
        state=state,
        total_optimizer_steps=total_steps,
        log_handler=log_handler,
        wrapped=wrapped,
    )
    if resuming:
        _restore(session, ckpt)
    session.metrics = Metrics(
        run.path,
        enabled=accelerator.is_main_process,
        purge_step=state.global_step + 1 if resuming else None,
        wandb_cfg={"project": cfg.project_name, "name": cfg.run_name, "config": cfg.model_dump()}
        if cfg.wandb
        else None,
    )
    if cfg.cache_latents:
        # Shared by all runs under logdir: keys cover the image file, crop, flip and VAE weights.
        session.latent_cache = LatentCache(Path(cfg.logdir) / ".cache" / "latents", _vae_fingerprint(model))
        eval_items = [it for items in data.val_sets.values() for it in items] + list(data.stabilize_items)
        with accelerator.main_process_first():  # rank 0 fills the shared cache; the others reuse it
            for items in (None, eval_items):  # None = the training items
                if items == []:
                    continue
                fill_latent_cache(
                    data, session.latent_cache, step.encode_latents, batch_size=cfg.batch_size, items=items
                )
    session.observers = _build_observers(session, autocast_dtype)
    if accelerator.is_main_process:
        write_json(run.path / "train_effective.json", json.loads(config_to_json(cfg)))
        write_json(run.path / "optimizer_effective.json", opt_file.as_dict())
    log.info(
        "device %s (%d process(es)), precision %s%s, %d optimizer steps (%d per epoch x %d epochs)",
        device,
        accelerator.num_processes,
        "fp32" if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
        " + GradScaler" if session.scaler is not None else "",
        total_steps,
        data.windows_per_epoch(),
        cfg.max_epochs,
    )
    log.info("%s", describe_threads())
    return session


def _broadcast_run_folder(accelerator: Accelerator, run: RunFolder | None) -> RunFolder:
    """Rank 0 names the run folder; other ranks learn it (they never create one)."""
    if accelerator.num_processes == 1:
        return run
    from accelerate.utils import broadcast_object_list

    holder = [str(run.path) if run is not None else None]
    broadcast_object_list(holder, from_process=0)
    return RunFolder(Path(holder[0]))


def _data_settings(cfg: TrainConfig, accelerator: Accelerator) -> DataSettings:
    workers = (
        cfg.num_workers if cfg.num_workers is not None else min(4, max(0, (torch.get_num_threads() // 2)))
    )
    return DataSettings(
        data_root=cfg.data_root,
        resolution=cfg.resolution,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        seed=cfg.seed,
        flip_p=cfg.flip_p,
        shuffle_tags=cfg.shuffle_tags,
        keep_tags=cfg.keep_tags,
        cond_dropout=cfg.cond_dropout,
        crop_jitter=0.0 if cfg.cache_latents else 0.02,
        validation_config=cfg.validation_config,
        num_workers=workers,
        scan_cache=Path(cfg.logdir) / ".cache" / "scan.json",
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )


def _step_settings(cfg: TrainConfig) -> StepSettings:
    return StepSettings(
        zero_frequency_noise_ratio=cfg.zero_frequency_noise_ratio,
        pyramid_noise_discount=cfg.pyramid_noise_discount or 0.0,
        timestep_start=cfg.timestep_start,
        timestep_end=cfg.timestep_end,
        min_snr_gamma=cfg.min_snr_gamma,
        loss_type=cfg.loss_type,
        clip_skip=cfg.clip_skip,
        max_token_length=cfg.max_token_length,
        embedding_perturbation=cfg.embedding_perturbation,
    )


def _build_optim(cfg: TrainConfig, opt_file: OptimizerFile, model: SDComponents, data: DataPlan):
    total = data.windows_per_epoch() * cfg.max_epochs
    settings = TrainOptimSettings(
        lr=cfg.lr,
        lr_scheduler=cfg.lr_scheduler,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=cfg.lr_decay_steps,
        clip_grad_norm=cfg.clip_grad_norm,
        disable_unet_training=cfg.disable_unet_training,
        disable_textenc_training=cfg.disable_textenc_training,
        clip_skip=cfg.clip_skip,
        log_step=cfg.log_step,
    )
    model.vae.requires_grad_(False)
    optim = build_optimizers(
        opt_file, settings, unet=model.unet, text_encoder=model.text_encoder, total_optimizer_steps=total
    )
    return optim, total


_WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def place_models(
    model: SDComponents, device: torch.device, autocast_dtype, *, weight_dtype: torch.dtype = torch.float32
) -> None:
    """Move models to the device (after freezing). Frozen parts go to half precision on GPU only
    (on CPU half-precision kernels are slow or missing); trained modules to `weight_dtype`.
    Parameters keep their identity, so optimizers built before this still hold them."""
    frozen_dtype = autocast_dtype if (device.type == "cuda" and autocast_dtype is not None) else torch.float32
    model.vae.to(device).eval()
    te_trainable = any(p.requires_grad for p in model.text_encoder.parameters())
    unet_trainable = any(p.requires_grad for p in model.unet.parameters())
    model.text_encoder.to(device)
    model.unet.to(device)
    if frozen_dtype != torch.float32:
        model.vae.to(dtype=frozen_dtype)
    for module, trainable in ((model.text_encoder, te_trainable), (model.unet, unet_trainable)):
        dtype = weight_dtype if trainable else frozen_dtype
        if dtype != torch.float32:
            # nn.Module.to: diffusers' override warns about fp32-only modules, which SD models lack.
            torch.nn.Module.to(module, dtype=dtype)
    model.unet.train()
    model.text_encoder.train(te_trainable)


def compile_unet(unet: torch.nn.Module, *, backend: str, mode: str) -> None:
    """`torch.compile` the UNet in place (`module.compile()`), so state_dict keys, saving, EMA and
    DDP see the same module. Works with gradient checkpointing (diffusers uses the non-reentrant
    variant, which dynamo traces). Each new input shape (aspect bucket, short last batch)
    recompiles once; after the second, dynamic shapes are used."""
    unet.compile(backend=backend, mode=None if mode == "default" else mode)
    log.info("torch.compile: UNet with backend %s, mode %s (first steps compile)", backend, mode)


def wrap_optimizer_set(
    optim: OptimizerSet,
    *,
    weight_dtype: str,
    fused_back_pass: bool,
    uses_grad_scaler: bool,
    device: torch.device,
    seed: int,
    world_size: int = 1,
) -> OptimizerSet | FusedOptimizerSet:
    """bf16 stochastic rounding (`weight_dtype` "bf16") and the fused back pass around a built
    OptimizerSet; ConfigError when the fused back pass is impossible (fused_backward.py)."""
    rounding = None
    if weight_dtype == "bf16":
        rounding = StochasticRounding(device, seed=seed)
        optim.rounding = rounding
    if not fused_back_pass:
        return optim
    return FusedOptimizerSet(
        optim, uses_grad_scaler=uses_grad_scaler, world_size=world_size, rounding=rounding
    )


def _text_cache(cfg: TrainConfig, model: SDComponents) -> TextEmbeddingCache | None:
    """In-memory text-encoder output cache (host memory: ~118-236 KB per distinct SD1.5 caption)."""
    if not cfg.cache_text_encoder_outputs:
        return None
    fingerprint = text_encoder_fingerprint(model.text_encoder, model.source)
    return TextEmbeddingCache(
        fingerprint, clip_skip=cfg.clip_skip, max_token_length=cfg.max_token_length, storage_device="cpu"
    )


def enable_gradient_checkpointing(model: SDComponents) -> None:
    """Activation checkpointing for the UNet, and for the text encoder when it trains."""
    model.unet.enable_gradient_checkpointing()
    if any(p.requires_grad for p in model.text_encoder.parameters()):
        model.text_encoder.gradient_checkpointing_enable()


def _prepare_for_ddp(accelerator: Accelerator, model: SDComponents) -> dict[str, torch.nn.Module]:
    """Wrap each trained module with accelerate (DDP when distributed; unchanged otherwise).

    Optimizers are built on the unwrapped parameters (the same tensors) and EMA / saving use the
    unwrapped modules, so checkpoints never carry a `module.` prefix.
    """
    wrapped = {}
    for name in ("unet", "text_encoder"):
        module = getattr(model, name)
        if any(p.requires_grad for p in module.parameters()):
            wrapped[name] = accelerator.prepare_model(module, device_placement=False)
    return wrapped


def _build_ema(cfg: TrainConfig, model: SDComponents, total_steps: int) -> EMA | None:
    if not cfg.ema_enabled:
        return None
    decay = cfg.ema_decay_rate
    if decay is None:
        decay = decay_from_strength_target(
            cfg.ema_strength_target, max(1, total_steps // cfg.ema_update_interval)
        )
    modules = {"unet": model.unet}
    if any(p.requires_grad for p in model.text_encoder.parameters()):
        modules["text_encoder"] = model.text_encoder
    device = "cpu" if cfg.ema_device == "cpu" else model.unet.device
    return EMA(modules, decay=decay, update_interval=cfg.ema_update_interval, device=device)


def _vae_fingerprint(model: SDComponents) -> str:
    h = hashlib.sha256(model.source.encode())
    for name, tensor in sorted(model.vae.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(tensor.float().flatten()[:64].numpy().tobytes())
    return h.hexdigest()[:16]


def _restore(session: Session, ckpt: CheckpointInfo) -> None:
    """Restore optimizer, scheduler, scaler, EMA, counters and RNG; refuse unsafe changes."""
    state = load_training_state(ckpt.path / TRAINING_STATE)
    current = session.resume_guard()
    changed = {k: (state["guard"].get(k), v) for k, v in current.items() if state["guard"].get(k) != v}
    if changed:
        details = "; ".join(f"{k}: checkpoint {old!r} -> now {new!r}" for k, (old, new) in changed.items())
        raise CheckpointError(
            f"cannot resume '{ckpt.path}' exactly because settings changed ({details}). Restore them, or "
            f"start a new run from its weights with --resume_ckpt {ckpt.path / PIPELINE_DIR}"
        )
    session.optim.load_state_dict(state["optimizers"])
    if session.scaler is not None and state.get("scaler"):
        session.scaler.load_state_dict(state["scaler"])
    if session.ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"'{ckpt.path}' has no EMA state but EMA is enabled now")
        session.ema.load_state_dict(state["ema"])
    session.state.load_state_dict(state["progress"])
    restore_global_rng(state["rng"][session.accelerator.process_index])
    session.resumed_from = ckpt.path
    log.info(
        "resumed %s at epoch %d, batch %d, step %d",
        ckpt.path,
        session.state.epoch,
        session.state.batch_in_epoch,
        session.state.global_step,
    )


def training_state_dict(session: Session, all_rng: list[dict]) -> dict:
    return {
        "guard": session.resume_guard(),
        "optimizers": session.optim.state_dict(),
        "scaler": session.scaler.state_dict() if session.scaler is not None else None,
        "ema": session.ema.state_dict() if session.ema is not None else None,
        "progress": session.state.state_dict(),
        "rng": all_rng,
    }


def gather_rng_states(accelerator: Accelerator) -> list[dict]:
    """Every rank's global RNG state, indexed by rank (collective: all ranks must call)."""
    mine = capture_global_rng()
    if accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return gather_object([mine])


def _build_observers(session: Session, autocast_dtype) -> Observers:
    """Sample generator and validator, each only when configured."""
    cfg, model = session.cfg, session.model
    sampler, sample_at_start = None, cfg.sample_at_start
    if cfg.sample_prompts:
        captions = [it.caption.text for it in session.data.train_items[:64]]
        jobs, spec = load_sample_jobs(
            cfg.sample_prompts, resolution=cfg.resolution, default_seed=cfg.seed, fallback_captions=captions
        )
        sample_at_start = sample_at_start and spec.generate_pretrain_samples
        sample_dtype = autocast_dtype
        if sample_dtype is None and cfg.weight_dtype == "bf16":
            sample_dtype = torch.bfloat16  # bf16 weights next to an fp32 VAE: the pipeline must autocast
        variants = sample_variants(
            ema_enabled=session.ema is not None,
            sample_ema=cfg.ema_sample_ema_model,
            sample_live=cfg.ema_sample_nonema_model,
        )
        sampler = SampleGenerator(
            jobs,
            session.run.samples,
            variants=variants,
            zero_terminal_snr=cfg.enable_zero_terminal_snr,
            autocast_dtype=sample_dtype,
        )
    validator = None
    val_cfg = load_validation_config(cfg.validation_config)
    if val_cfg is not None:
        acc = session.accelerator
        # Validation runs the unwrapped modules: no DDP collectives, so ranks never wait on each other.
        eval_step = TrainingStep(
            unet=acc.unwrap_model(model.unet),
            text_encoder=acc.unwrap_model(model.text_encoder),
            vae=model.vae,
            tokenizer=model.tokenizer,
            schedule=session.step.schedule,
            settings=replace(session.step.settings, embedding_perturbation=0.0),
            device=session.device,
            autocast_dtype=autocast_dtype,
            text_cache=session.step.text_cache,  # outputs depend only on the caption: safe to share
        )
        validator = Validator(
            session.data,
            val_cfg,
            eval_step,
            acc,
            batch_size=cfg.batch_size,
            latent_cache=session.latent_cache,
        )
    return Observers(session, sampler=sampler, validator=validator, sample_at_start=sample_at_start)
