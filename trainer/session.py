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
from trainer.chaining import (
    ResumePlan,
    check_settings,
    plan_resume,
    resolve_seed,
    schedule_horizon,
    warn_horizon_change,
)
from trainer.chaining import resume_guard as settings_guard
from trainer.checkpoint import CheckpointInfo
from trainer.config import TrainConfig, config_to_json
from trainer.data import DataPlan, DataSettings, LatentCache, auto_num_workers, fill_latent_cache, load_data
from trainer.data.latent_cache import cache_directory, vae_fingerprint
from trainer.data.validation_split import load_validation_config
from trainer.determinism import configure_determinism
from trainer.diffusion import NoiseSchedule
from trainer.ema import EMA, ema_decay_for_run
from trainer.errors import CheckpointError, RunFinished
from trainer.extra_options import active_extra_options, extra_step_settings
from trainer.logging import Metrics, config_text
from trainer.models import SDComponents, load_model
from trainer.observe import Observers
from trainer.optim import (
    FusedOptimizerSet,
    OptimizerFile,
    OptimizerSet,
    TrainOptimSettings,
    build_optimizers,
    check_text_encoder_lr_scale,
    load_optimizer_file,
)
from trainer.param_layout import keep_parameter_layouts
from trainer.placement import WEIGHT_DTYPES, ExportPrecision, place_models
from trainer.precision import configure_cuda_backends, make_grad_scaler, resolve_autocast_dtype
from trainer.preflight import check_inputs, finished_message
from trainer.run import RunFolder, StartupLog, new_run_folder, run_folder_of_checkpoint, write_json
from trainer.sampling import (
    SampleGenerator,
    load_sample_jobs,
    make_sample_scheduler,
    pretrain_samples_wanted,
    sample_variants,
)
from trainer.state import TrainingState, capture_global_rng, restore_global_rng, seed_everything
from trainer.step import StepSettings, TrainingStep
from trainer.stochastic_rounding import StochasticRounding, rounding_seed
from trainer.te_stop import stop_text_encoder_on_resume
from trainer.text_cache import TextEmbeddingCache, text_encoder_fingerprint
from trainer.threads import describe_threads
from trainer.validation import Validator

log = logging.getLogger(__name__)


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
    plan: ResumePlan | None = None  # how this run started (new, exact resume, weights only)
    observers: Observers | None = None
    log_handler: logging.Handler | None = None  # this run's train.log on the root logger
    wrapped: dict[str, torch.nn.Module] | None = None  # trainable modules as prepared by accelerate (DDP)
    export_precision: ExportPrecision | None = (
        None  # loaded values of frozen weights stored in half precision
    )

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
        return settings_guard(
            self.cfg,
            world_size=self.accelerator.num_processes,
            data_fingerprint=self.data.fingerprint(),
            optim=self.optim,
        )

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The trained modules as the step calls them (DDP-wrapped when distributed)."""
        return dict(self.wrapped or {})


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(config_to_json(cfg).encode()).hexdigest()[:16]


def build_session(cfg: TrainConfig, *, accelerator: Accelerator | None = None) -> Session:
    configure_determinism(cfg)  # before anything touches CUDA (cuBLAS reads its workspace setting once)
    # Precision is ours (mixed_precision key), not accelerate's: it must not autocast a second time.
    accelerator = accelerator or Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    check_inputs(cfg)  # every named file, before the model loads
    startup_log = StartupLog()  # the run folder (and its train.log) is created once all went well
    try:
        plan = plan_resume(cfg.resume_ckpt, cfg.logdir, cfg.project_name)
        if plan.exact and (finished := finished_message(cfg, plan.checkpoint.manifest, plan.checkpoint.path)):
            raise RunFinished(finished)
        cfg = cfg.model_copy(update={"seed": resolve_seed(cfg.seed, plan)})
        return _build(cfg, accelerator, plan, startup_log)
    except BaseException:
        startup_log.detach_file()  # the error itself is logged by the caller, on the console
        raise
    finally:
        startup_log.discard()


def _build(cfg, accelerator, plan: ResumePlan, startup_log: StartupLog) -> Session:
    seed_everything(cfg.seed)
    opt_file = load_optimizer_file(cfg.optimizer_config)
    check_text_encoder_lr_scale(opt_file, cfg.lr, text_encoder_trains=not cfg.disable_textenc_training)
    model = load_model(
        plan.spec,
        vae=cfg.vae,
        prediction_type=cfg.prediction_type,
        zero_terminal_snr=cfg.enable_zero_terminal_snr,
    )
    log.info("model: %s (%s)", model.source, model.family)
    configure_attention(model.unet, model.text_encoder, cfg.attn_type, device=accelerator.device)  # logs it
    data = load_data(_data_settings(cfg, accelerator))
    device = accelerator.device
    autocast_dtype = resolve_autocast_dtype(cfg.mixed_precision, cfg.disable_amp, device)
    # `deterministic` needs cuDNN autotuning off (configure_determinism already turned it off).
    cuda_modes = configure_cuda_backends(device, allow_tf32=cfg.allow_tf32, benchmark=not cfg.deterministic)
    scaler = make_grad_scaler(autocast_dtype, device)
    optim, total_steps = _build_optim(cfg, opt_file, model, data)
    ema_decay = _ema_decay(cfg, total_steps)  # refuses an EMA that would never update, before the run folder
    optim = wrap_optimizer_set(
        optim,
        weight_dtype=cfg.weight_dtype,
        fused_back_pass=cfg.fused_back_pass,
        uses_grad_scaler=scaler is not None,
        device=device,
        seed=cfg.seed,  # one rounding stream on every rank: replicas stay identical (rounding_seed)
        world_size=accelerator.num_processes,
        channels_last=cfg.channels_last,
    )
    plan = check_settings(
        plan,
        settings_guard(
            cfg, world_size=accelerator.num_processes, data_fingerprint=data.fingerprint(), optim=optim
        ),
    )
    resuming = plan.exact
    log.info("%s", data.summary())
    log.info("optimizer settings (%s):\n%s", opt_file.source, optim.summary_table())

    # The VAE's identity for the latent cache, read while its weights are on the CPU.
    vae_state = model.vae.state_dict() if cfg.cache_latents else None
    export_precision = place_models(
        model, device, autocast_dtype, weight_dtype=WEIGHT_DTYPES[cfg.weight_dtype]
    )
    vae_id = vae_fingerprint(vae_state, model.vae.dtype) if vae_state is not None else None
    del vae_state  # the fingerprint is all the cache needs of the pre-placement weights
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
    session = Session(
        cfg=cfg,
        opt_file=opt_file,
        accelerator=accelerator,
        model=model,
        data=data,
        step=step,
        optim=optim,
        scaler=scaler,
        ema=_build_ema(cfg, model, ema_decay),
        metrics=None,  # set below, after the resume step is known
        run=None,  # set below, once the run starts
        state=state,
        total_optimizer_steps=total_steps,
        wrapped=wrapped,
        plan=plan,
        export_precision=export_precision,
    )
    if resuming:
        stop_text_encoder_on_resume(session, plan.state["progress"]["global_step"])
        _restore(session, plan)
    session.run, session.log_handler = _start_run_folder(
        cfg, accelerator, plan.checkpoint if resuming else None, startup_log
    )
    run = session.run
    session.metrics = Metrics(
        run.path,
        enabled=accelerator.is_main_process,
        purge_step=state.global_step + 1 if resuming else None,
        wandb_cfg={"project": cfg.project_name, "name": cfg.run_name, "config": cfg.model_dump()}
        if cfg.wandb
        else None,
    )
    if cfg.cache_latents:
        # Shared by all runs under logdir: keys cover the image file, crop, flip and VAE weights
        # (and the dtype it encodes in), not the model's path, so a resume reuses every entry.
        session.latent_cache = LatentCache(
            cache_directory(cfg.logdir), vae_id, masks=data.settings.mask_source
        )
        log.info("latent cache: %s, VAE fingerprint %s", session.latent_cache.directory, vae_id)
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
        for tag, values in (("train", json.loads(config_to_json(cfg))), ("optimizer", opt_file.as_dict())):
            session.metrics.text(f"config/{tag}", config_text(values), state.global_step)
    log.info("%s", plan.describe())
    log.info(
        "device %s (%d process(es)), precision %s%s%s, %d optimizer steps (%d per epoch x %d epochs)",
        device,
        accelerator.num_processes,
        "fp32" if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
        " + GradScaler" if session.scaler is not None else "",
        f", {cuda_modes}" if cuda_modes else "",
        total_steps,
        data.windows_per_epoch(),
        cfg.max_epochs,
    )
    log.info("%s", describe_threads())
    if extras := active_extra_options(cfg):
        log.info("kohya/OneTrainer options: %s", "; ".join(extras))
    return session


def _start_run_folder(cfg, accelerator, ckpt: CheckpointInfo | None, startup_log: StartupLog):
    """The run starts: a resumed run keeps its folder, a new one gets a fresh folder (rank 0
    creates it), and train.log opens with the start-up lines. Returns (run, log handler)."""
    if ckpt is not None:
        run = run_folder_of_checkpoint(ckpt.path)
    else:
        run = new_run_folder(cfg.logdir, cfg.project_name) if accelerator.is_main_process else None
        run = _broadcast_run_folder(accelerator, run)
    handler = startup_log.attach(run) if accelerator.is_main_process else None
    return run, handler


def _broadcast_run_folder(accelerator: Accelerator, run: RunFolder | None) -> RunFolder:
    """Rank 0 names the run folder; other ranks learn it (they never create one)."""
    if accelerator.num_processes == 1:
        return run
    from accelerate.utils import broadcast_object_list

    holder = [str(run.path) if run is not None else None]
    broadcast_object_list(holder, from_process=0)
    return RunFolder(Path(holder[0]))


def _data_settings(cfg: TrainConfig, accelerator: Accelerator) -> DataSettings:
    workers = cfg.num_workers if cfg.num_workers is not None else auto_num_workers(torch.get_num_threads())
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
        masked_loss=cfg.masked_loss,
        mask_from_alpha=cfg.mask_from_alpha,
        caption_dropout_every_n_epochs=cfg.caption_dropout_every_n_epochs,
        keep_tokens_separator=cfg.keep_tokens_separator,
    )


def _step_settings(cfg: TrainConfig) -> StepSettings:
    return StepSettings(
        **extra_step_settings(cfg),
        zero_frequency_noise_ratio=cfg.zero_frequency_noise_ratio,
        pyramid_noise_discount=cfg.pyramid_discount,
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
    channels_last: bool = False,
) -> OptimizerSet | FusedOptimizerSet:
    """bf16 stochastic rounding (`weight_dtype` "bf16") and the fused back pass around a built
    OptimizerSet; ConfigError when the fused back pass is impossible (fused_backward.py).

    `seed` is the run seed, the same on every rank: all replicas round an identical all-reduced
    update with identical bits. With `channels_last`, every optimizer keeps its parameters'
    layout and storage across steps (trainer/param_layout.py)."""
    rounding = None
    if weight_dtype == "bf16":
        rounding = StochasticRounding(device, seed=rounding_seed(seed))
        optim.rounding = rounding
    if fused_back_pass:
        optim = FusedOptimizerSet(
            optim, uses_grad_scaler=uses_grad_scaler, world_size=world_size, rounding=rounding
        )
    if channels_last:
        keep_parameter_layouts(_optimizers_of(optim))
    return optim


def _optimizers_of(optim: OptimizerSet | FusedOptimizerSet) -> list[torch.optim.Optimizer]:
    if isinstance(optim, FusedOptimizerSet):
        return [opt for fused in optim.fused.values() for opt in fused.optimizers]
    return [comp.optimizer for comp in optim.components.values()]


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


def _ema_decay(cfg: TrainConfig, total_steps: int) -> float | None:
    if not cfg.ema_enabled:
        return None
    return ema_decay_for_run(
        decay_rate=cfg.ema_decay_rate,
        strength_target=cfg.ema_strength_target,
        update_interval=cfg.ema_update_interval,
        total_steps=total_steps,
    )


def _build_ema(cfg: TrainConfig, model: SDComponents, decay: float | None) -> EMA | None:
    if decay is None:
        return None
    modules = {"unet": model.unet}
    if any(p.requires_grad for p in model.text_encoder.parameters()):
        modules["text_encoder"] = model.text_encoder
    device = "cpu" if cfg.ema_device == "cpu" else model.unet.device
    return EMA(modules, decay=decay, update_interval=cfg.ema_update_interval, device=device)


def _restore(session: Session, plan: ResumePlan) -> None:
    """Restore optimizer, scheduler, scaler, EMA, counters and RNG (settings already checked)."""
    state, ckpt = plan.state, plan.checkpoint
    session.optim.load_state_dict(state["optimizers"])
    warn_horizon_change(state.get("horizon"), session.optim, session.total_optimizer_steps)
    if session.scaler is not None and state.get("scaler"):
        session.scaler.load_state_dict(state["scaler"])
    if session.ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"'{ckpt.path}' has no EMA state but EMA is enabled now")
        session.ema.load_state_dict(state["ema"])
    session.state.load_state_dict(state["progress"])
    restore_global_rng(state["rng"][session.accelerator.process_index])
    session.resumed_from = ckpt.path
    session.plan = replace(plan, state=None)  # the optimizer states are GBs: do not hold a copy
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
        "horizon": schedule_horizon(session.optim, session.total_optimizer_steps),
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
    sampler, sample_at_start = None, False
    if cfg.sample_prompts:
        captions = [it.caption.text for it in session.data.train_items]
        jobs, spec = load_sample_jobs(
            cfg.sample_prompts, resolution=cfg.resolution, default_seed=cfg.seed, fallback_captions=captions
        )
        sample_at_start = pretrain_samples_wanted(cfg.sample_at_start, cfg.sample_prompts, spec)
        make_sample_scheduler(  # refuse a scheduler that cannot sample this model now, not at step N
            model.scheduler_config, spec.scheduler, zero_terminal_snr=cfg.enable_zero_terminal_snr
        )
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
            spec=spec,
            captions=captions,
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
            settings=replace(session.step.settings, embedding_perturbation=0.0, ip_noise_gamma=0.0),
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
