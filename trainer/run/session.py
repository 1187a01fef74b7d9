"""A training session: the built components plus the run around them (run folder, metrics,
observers, resume). `build_session` is what the CLI and the tests call; the loop runs the result.

`build_session` resolves the model source (including `findlast` and resuming from a checkpoint
of this trainer), builds the components (trainer/parts/builder.py), decides exact resume against the
checkpoint's guard (trainer/checkpointing/), restores the training state, and only then creates
or reopens the run folder. Nothing here trains.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from trainer.checkpointing import (
    ResumePlan,
    check_settings,
    plan_resume,
    random_seed,
    resolve_seed,
    restore_training_state,
    resume_guard,
)
from trainer.checkpointing.contents import CheckpointExtra, base_model_of
from trainer.checkpointing.resume_changes import log_resume_changes
from trainer.checkpointing.state import TrainingState
from trainer.checkpointing.store import CheckpointInfo
from trainer.config import TrainConfig, config_to_json
from trainer.config.summary import active_extra_options
from trainer.data import LatentCache, LoadedDataset, fill_latent_cache
from trainer.data.latent_cache import cache_directory
from trainer.data.validation_split import load_validation_config
from trainer.eval.observe import Observers
from trainer.eval.sampling import (
    SampleGenerator,
    load_sample_jobs,
    make_sample_scheduler,
    pretrain_samples_wanted,
    sample_variants,
)
from trainer.eval.validation import Validator
from trainer.export.checkpoint_lora import checkpoint_lora
from trainer.models import SDComponents
from trainer.optim import OptimizerFile, TrainingOptimizer
from trainer.parts.builder import Components, build_components, evaluation_step
from trainer.parts.ema import EMA
from trainer.parts.parking import InPlaceExtra, Parking, park_after_caches
from trainer.parts.placement import ExportPrecision
from trainer.plan.check import startup_check
from trainer.run.folder import (
    RunFolder,
    StartupLog,
    claim_run_folder,
    lock_resumed_folder,
    new_run_folder,
    run_folder_of_checkpoint,
    write_json,
)
from trainer.run.metrics import Metrics, config_text
from trainer.run.preflight import check_inputs, finished_message
from trainer.run.te_stop import stop_text_encoder_if_due
from trainer.runtime.determinism import configure_determinism
from trainer.runtime.errors import RunFinished
from trainer.runtime.threads import describe_threads
from trainer.step.training_step import TrainingStep

log = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything the loop touches: the built parts (`parts`, the builder's `Components`, held
    once, never copied) and the run around them. The state that a checkpoint restores lives in
    objects with state_dict()/load_state_dict() (the optimizers, scaler, EMA, `state`); the run
    folder, metrics and observers are outputs, rebuilt on resume."""

    cfg: TrainConfig
    accelerator: Accelerator
    parts: Components
    run: RunFolder
    metrics: Metrics
    state: TrainingState
    observers: Observers
    plan: ResumePlan  # how this run started (new, exact resume, weights only)
    latent_cache: LatentCache | None = None
    resumed_from: Path | None = None
    log_handler: logging.Handler | None = None  # this run's train.log on the root logger
    # written into every checkpoint folder after the weights (extract_lora_rank: trainer/export/checkpoint_lora.py)
    checkpoint_extra: CheckpointExtra | None = None

    # --- the built parts, read through the session ---

    @property
    def model(self) -> SDComponents:
        return self.parts.model

    @property
    def data(self) -> LoadedDataset:
        return _dataset(self.parts)

    @property
    def step(self) -> TrainingStep:
        return self.parts.step

    @property
    def optim(self) -> TrainingOptimizer:
        return self.parts.optim

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return self.parts.scaler

    @property
    def ema(self) -> EMA | None:
        return self.parts.ema

    @property
    def opt_file(self) -> OptimizerFile:
        return self.parts.opt_file

    @property
    def total_optimizer_steps(self) -> int:
        return self.parts.total_optimizer_steps

    @property
    def export_precision(self) -> ExportPrecision | None:
        """Loaded values of frozen weights stored in half precision."""
        return self.parts.export_precision

    def close(self) -> None:
        """End the run: close the metrics (TensorBoard's files, `wandb.finish()`, which marks a
        wandb run finished and uploads its last data), release the optimizers' hooks on the
        parameters (a closed session trains no more) and detach train.log from the root logger.
        Call when the run is over (after its summary is logged); otherwise later runs in the same
        process also write into it. Idempotent."""
        self.metrics.close()
        self.optim.close()  # the fused back pass's per-parameter hooks; nothing for a plain set
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
            self.log_handler.close()
            self.log_handler = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The trained modules as the step calls them (DDP-wrapped when distributed)."""
        return dict(self.parts.wrapped)


def _dataset(parts: Components) -> LoadedDataset:
    """The run's dataset: `build_components` loads it unless a benchmark gives the step count."""
    if parts.data is None:
        raise ValueError(
            "a training session needs the dataset (build_components without total_optimizer_steps)"
        )
    return parts.data


def build_session(cfg: TrainConfig, *, accelerator: Accelerator | None = None) -> Session:
    configure_determinism(cfg)  # before anything touches CUDA (cuBLAS reads its workspace setting once)
    # Precision is ours (mixed_precision key), not accelerate's: it must not autocast a second time.
    accelerator = accelerator or Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    check_inputs(cfg)  # every named file, before the model loads
    # the memory plan against the budget, before the model loads (auto_fit: the fitted recipe)
    cfg, opt_file = startup_check(cfg, device=accelerator.device.type, processes=accelerator.num_processes)
    startup_log = StartupLog()  # the run folder (and its train.log) is created once all went well
    try:
        plan = plan_resume(cfg.resume_ckpt, cfg.logdir, cfg.project_name)
        if plan.exact and (finished := finished_message(cfg, plan.source.manifest, plan.source.path)):
            raise RunFinished(finished)
        cfg = cfg.model_copy(update={"seed": resolve_seed(cfg.seed, plan, draw=_seed_draw(accelerator))})
        return _start(cfg, accelerator, plan, startup_log, opt_file=opt_file)
    except BaseException:
        startup_log.detach_file()  # the error itself is logged by the caller, on the console
        raise
    finally:
        startup_log.discard()


def _seed_draw(accelerator: Accelerator) -> Callable[[], int] | None:
    """For `seed: -1` in a multi-process run: rank 0 draws and every rank trains with that seed.
    Each rank drawing its own would shuffle and shard the data differently per rank (some images
    seen twice an epoch, others never) and break 1-process == N-process."""
    if accelerator.num_processes == 1:
        return None

    def draw() -> int:
        seed = [random_seed() if accelerator.is_main_process else None]
        return int(broadcast_object_list(seed, from_process=0)[0])

    return draw


def _start(
    cfg: TrainConfig,
    accelerator: Accelerator,
    plan: ResumePlan,
    startup_log: StartupLog,
    *,
    opt_file: OptimizerFile | None = None,
) -> Session:
    parts = build_components(cfg, accelerator, model_spec=plan.spec, opt_file=opt_file)
    data = _dataset(parts)
    plan = check_settings(
        plan,
        resume_guard(
            cfg, world_size=accelerator.num_processes, data_fingerprint=data.fingerprint(), optim=parts.optim
        ),
    )
    state = TrainingState()
    plan, resumed_from = _restore(cfg, accelerator, plan, parts, state)
    run, log_handler = _start_run_folder(
        cfg, accelerator, plan.checkpoint if plan.exact else None, startup_log
    )
    metrics = Metrics(
        run.path,
        enabled=accelerator.is_main_process,
        purge_step=state.global_step + 1 if plan.exact else None,
        wandb_cfg={"project": cfg.project_name, "name": cfg.run_name, "config": cfg.model_dump()}
        if cfg.wandb
        else None,
    )
    latent_cache = _fill_latent_cache(cfg, accelerator, parts) if cfg.cache_latents else None
    parking = park_after_caches(
        cfg, model=parts.model, step=parts.step, data=data, device=accelerator.device
    )  # the VAE and a cached text encoder off the device until samples
    observers = _build_observers(
        cfg,
        parts,
        accelerator,
        run,
        metrics,
        state,
        latent_cache=latent_cache,
        resumed=resumed_from is not None,
        parking=parking,
    )
    _log_start(cfg, accelerator, parts, run, metrics, state, plan)
    # extract_lora_rank: a LoRA in every checkpoint folder
    checkpoint_extra: CheckpointExtra | None = checkpoint_lora(cfg)
    if checkpoint_extra is not None and parking.parked:
        checkpoint_extra = InPlaceExtra(parking, checkpoint_extra)  # its probe runs the parked encoder
    _log_checkpoint_lora(cfg, plan, checkpoint_extra)
    return Session(
        cfg=cfg,
        accelerator=accelerator,
        parts=parts,
        run=run,
        metrics=metrics,
        state=state,
        observers=observers,
        plan=plan,
        latent_cache=latent_cache,
        resumed_from=resumed_from,
        log_handler=log_handler,
        checkpoint_extra=checkpoint_extra,
    )


def _restore(
    cfg: TrainConfig, accelerator: Accelerator, plan: ResumePlan, parts: Components, state: TrainingState
) -> tuple[ResumePlan, Path | None]:
    """Exact resume: the training state into the built parts (after a text-encoder stop that
    happened before the checkpoint) and the change table. Returns the plan without its state
    and the checkpoint resumed from (None for a new run or weights only)."""
    if not plan.exact:
        return plan, None
    stop_text_encoder_if_due(cfg, parts, accelerator, plan.saved_state["progress"]["global_step"])
    restore_training_state(
        plan,
        optim=parts.optim,
        scaler=parts.scaler,
        ema=parts.ema,
        progress=state,
        total_optimizer_steps=parts.total_optimizer_steps,
        rank=accelerator.process_index,
    )
    # before this session rewrites train_effective.json: the change table compares with it
    checkpoint_config = run_folder_of_checkpoint(plan.source.path).path / "train_effective.json"
    log_resume_changes(plan, parts.optim, cfg, parts.total_optimizer_steps, checkpoint_config)
    return replace(plan, state=None), plan.source.path  # the optimizer states are GBs: no copy kept


def _log_start(
    cfg: TrainConfig,
    accelerator: Accelerator,
    parts: Components,
    run: RunFolder,
    metrics: Metrics,
    state: TrainingState,
    plan: ResumePlan,
) -> None:
    """The effective config files in the run folder and TensorBoard, and the start-up lines."""
    data = _dataset(parts)
    if accelerator.is_main_process:
        write_json(run.path / "train_effective.json", json.loads(config_to_json(cfg)))
        write_json(run.path / "optimizer_effective.json", parts.opt_file.as_dict())
        for tag, values in (
            ("train", json.loads(config_to_json(cfg))),
            ("optimizer", parts.opt_file.as_dict()),
        ):
            metrics.text(f"config/{tag}", config_text(values), state.global_step)
    log.info("%s", plan.describe())
    log.info(
        "device %s (%d process(es)), precision %s%s%s, %d optimizer steps (%d per epoch x %d epochs)",
        accelerator.device,
        accelerator.num_processes,
        "fp32" if parts.autocast_dtype is None else str(parts.autocast_dtype).removeprefix("torch."),
        " + GradScaler" if parts.scaler is not None else "",
        f", {parts.cuda_modes}" if parts.cuda_modes else "",
        parts.total_optimizer_steps,
        data.windows_per_epoch(),
        cfg.max_epochs,
    )
    log.info("%s", describe_threads())
    if extras := active_extra_options(cfg):
        log.info("kohya/OneTrainer options: %s", "; ".join(extras))


def _log_checkpoint_lora(cfg: TrainConfig, plan: ResumePlan, extra: CheckpointExtra | None) -> None:
    """extract_lora_rank: the base every checkpoint's LoRA is taken against, or why none will be."""
    if extra is not None and cfg.extract_lora_rank is not None:
        base = base_model_of(plan) or "unknown (the checkpoint this run starts from records none)"
        log.info(
            "a LoRA of rank %d goes into every checkpoint, against the base %s", cfg.extract_lora_rank, base
        )


def _fill_latent_cache(cfg: TrainConfig, accelerator: Accelerator, parts: Components) -> LatentCache:
    """Shared by all runs under logdir: keys cover the image file, crop, flip and VAE weights
    (and the dtype it encodes in), not the model's path, so a resume reuses every entry."""
    data = _dataset(parts)
    assert parts.vae_fingerprint is not None  # the builder reads it whenever cache_latents is on
    cache = LatentCache(cache_directory(cfg.logdir), parts.vae_fingerprint, masks=data.settings.mask_source)
    log.info("latent cache: %s, VAE fingerprint %s", cache.directory, parts.vae_fingerprint)
    eval_items = [it for items in data.val_sets.values() for it in items] + list(data.stabilize_items)
    with accelerator.main_process_first():  # rank 0 fills the shared cache; the others reuse it
        for items in (None, eval_items):  # None = the training items
            if items == []:
                continue
            fill_latent_cache(data, cache, parts.step.encode_latents, batch_size=cfg.batch_size, items=items)
    return cache


def _start_run_folder(cfg, accelerator, ckpt: CheckpointInfo | None, startup_log: StartupLog):
    """The run starts: a resumed run keeps its folder, a new one gets a fresh folder (rank 0
    creates it), and train.log opens with the start-up lines. Returns (run, log handler).

    Rank 0 locks the folder (trainer/run/folder.py `RunLock`) before anything is written into it and
    holds the lock until the session closes (the train.log handler owns it); a second process is
    refused, naming the holder. The lock is taken here, after the model and training state are
    loaded, rather than before restoring them: which folder the run writes is known only once
    the resume plan and the settings check have chosen between exact resume (the checkpoint's
    folder) and a new run. The window this leaves, two `findlast` picking the same checkpoint,
    is closed once the lock is held: a folder into which another run saved a newer checkpoint
    meanwhile is refused (`lock_resumed_folder`). The cost is that a refused process has loaded
    the model before it learns the folder is taken."""
    if ckpt is not None:
        run = run_folder_of_checkpoint(ckpt.path)
        take = partial(lock_resumed_folder, run, ckpt, findlast=cfg.resume_ckpt == "findlast")
    else:
        take = partial(new_run_folder, cfg.logdir, cfg.project_name)
    run = claim_run_folder(accelerator, take)
    handler = startup_log.attach(run) if accelerator.is_main_process else None
    return run, handler


def _build_observers(
    cfg: TrainConfig,
    parts: Components,
    accelerator: Accelerator,
    run: RunFolder,
    metrics: Metrics,
    state: TrainingState,
    *,
    latent_cache: LatentCache | None,
    resumed: bool,
    parking: Parking | None = None,
) -> Observers:
    """Sample generator and validator, each only when configured."""
    model = parts.model
    sampler, sample_at_start = None, False
    if cfg.sample_prompts:
        captions = [it.caption.text for it in _dataset(parts).train_items]
        jobs, spec = load_sample_jobs(
            cfg.sample_prompts, resolution=cfg.resolution, default_seed=cfg.seed, fallback_captions=captions
        )
        sample_at_start = pretrain_samples_wanted(cfg.sample_at_start, cfg.sample_prompts, spec)
        make_sample_scheduler(  # refuse a scheduler that cannot sample this model now, not at step N
            model.scheduler_config, spec.scheduler, zero_terminal_snr=cfg.enable_zero_terminal_snr
        )
        sample_dtype = parts.autocast_dtype
        if sample_dtype is None and cfg.weight_dtype == "bf16":
            sample_dtype = torch.bfloat16  # bf16 weights next to an fp32 VAE: the pipeline must autocast
        variants = sample_variants(
            ema_enabled=parts.ema is not None,
            sample_ema=cfg.ema_sample_ema_model,
            sample_live=cfg.ema_sample_nonema_model,
        )
        sampler = SampleGenerator(
            jobs,
            run.samples,
            variants=variants,
            zero_terminal_snr=cfg.enable_zero_terminal_snr,
            autocast_dtype=sample_dtype,
            spec=spec,
            captions=captions,
        )
    validator = None
    val_cfg = load_validation_config(cfg.validation_config)
    if val_cfg is not None:
        validator = Validator(
            _dataset(parts),
            val_cfg,
            evaluation_step(parts, accelerator),
            accelerator,
            batch_size=cfg.batch_size,
            latent_cache=latent_cache,
        )
    return Observers(
        model=model,
        accelerator=accelerator,
        optim=parts.optim,
        state=state,
        metrics=metrics,
        ema=parts.ema,
        sampler=sampler,
        validator=validator,
        sample_at_start=sample_at_start,
        sample_steps=cfg.sample_steps,
        resumed=resumed,
        parking=parking,
    )
