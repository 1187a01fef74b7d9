"""Plan a recipe: the device memory of its peak, by category, from the built objects.

`evaluate` builds the run on shadow tensors (`fake_model.py`), reads the bytes of weights and
gradients off the modules and the optimizer states off the optimizers' layouts
(`optimizer_state.py`), runs one shadow training micro-step (`activations.py`), and places the
peak at the worst of three moments:

* the backward pass's own peak (activations, their gradients, parameter gradients so far);
* with `grad_accum` > 1, a later micro-batch's backward, which runs on top of every gradient
  the earlier ones accumulated;
* the optimizer step (not with the fused back pass, whose steps happen inside the backward):
  every gradient plus the step's working memory (`transients.py`).

Then the EMA on the device, and on CUDA the context and the allocator's slack (estimates, said
so in the plan's notes). `plan_memory` adds the budget and, when it does not fit, the advice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.data.buckets import get_buckets
from trainer.optim import OptimizerFile
from trainer.optim.fused_backward import check_fused_backward
from trainer.parts.ema import EMA
from trainer.parts.parking import parked_modules
from trainer.parts.precision import resolve_autocast_dtype
from trainer.plan.activations import CUDA_ALLOCATION_GRANULARITY, PassResult, run_pass
from trainer.plan.architecture import architecture_of
from trainer.plan.fake_model import FakeRun, arch_key, build_fake_run, module_bytes, tensor_bytes
from trainer.plan.host import HostPlan, plan_host
from trainer.plan.model import CATEGORIES, PlanSizes
from trainer.plan.optimizer_state import parameter_state, shared_state, state_bytes
from trainer.plan.sampling import ema_swap_bytes, largest_sample_call, sampling_working_bytes
from trainer.plan.transients import (
    DEFAULT_ROUNDING_CHUNK_BYTES,
    gradient_norm_bytes,
    optimizer_temporaries,
    rounding_bytes,
)

log = logging.getLogger(__name__)

# Estimates until bench/gpu_suite.py measures them (docs/PERFORMANCE.md): the CUDA context of a
# PyTorch process on an H100 (driver, kernels loaded lazily), the cuBLAS/cuDNN handles and
# workspaces created at the first matmul and convolution, and the caching allocator's slack
# (blocks reserved but not allocated at the peak) as a share of the allocated peak.
CUDA_CONTEXT_BYTES = 512 * 2**20
CUDA_LIBRARY_BYTES = 256 * 2**20
ALLOCATOR_MARGIN = 0.05


PARTS_LOGGER = "trainer.parts"


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Below WARNING, nothing from logger `name` (and its children) inside the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class Evaluation:
    categories: dict[str, int]
    sizes: PlanSizes
    settings: dict
    notes: tuple[str, ...]
    host: HostPlan | None = None


def target_autocast(cfg: TrainConfig, device: str) -> tuple[torch.dtype | None, list[str]]:
    """The autocast dtype the run will use on `device`, and a note when it had to be assumed."""
    if device == "cpu" or torch.cuda.is_available():
        return resolve_autocast_dtype(cfg.mixed_precision, cfg.disable_amp, torch.device(device)), []
    if cfg.disable_amp or cfg.mixed_precision == "no":
        return None, []
    if cfg.mixed_precision == "fp16":
        return torch.float16, []
    notes = []
    if cfg.mixed_precision == "auto":
        notes.append(
            "mixed_precision auto: planned as bf16 (GPUs with bf16 tensor cores); pre-Ampere GPUs use fp16, "
            "whose activations are the same size"
        )
    return torch.bfloat16, notes


def largest_bucket(resolution: int) -> tuple[int, int]:
    """The bucket with the most pixels (the square one: no bucket exceeds resolution**2)."""
    return max(get_buckets(resolution), key=lambda b: (b[0] * b[1], b[0] == b[1]))


# train.json keys the planning pass does not depend on among those the advice changes: the
# fused back pass and grad_accum change when gradients are freed or kept, not the pass.
_NOT_IN_PASS = {"fused_back_pass", "grad_accum"}


def pass_key(cfg: TrainConfig, opt_file: OptimizerFile, device: str) -> str:
    """Everything the planning pass depends on: the recipe without its optimizer choice (the
    pass's gradients are the same whatever steps them), the text-encoder freezing, the device."""
    settings = cfg.model_dump(mode="json", exclude=_NOT_IN_PASS)
    freezing = opt_file.text_encoder_freezing.model_dump(mode="json", exclude_unset=True)
    return json.dumps([settings, freezing, device], sort_keys=True)


def evaluate(
    cfg: TrainConfig,
    opt_file: OptimizerFile,
    device: str,
    *,
    processes: int = 1,
    passes: dict[str, PassResult] | None = None,
) -> Evaluation:
    """The peak of `cfg` on `device` by category, without budget or advice, for one of
    `processes` data-parallel processes. `passes` remembers planning passes by `pass_key`, for
    re-plans that change only the optimizer or fused_back_pass."""
    arch, source = architecture_of(cfg.resume_ckpt, logdir=cfg.logdir, project_name=cfg.project_name)
    autocast, notes = target_autocast(cfg, device)
    with _quiet(PARTS_LOGGER):  # the builders' start-up lines would describe this shadow build
        run = build_fake_run(arch, cfg, opt_file, device=device, autocast_dtype=autocast)
    comps = list(run.optim.components.values())
    if cfg.fused_back_pass:
        check_fused_backward(
            uses_grad_scaler=device == "cuda" and autocast is torch.float16,
            world_size=processes,
            optimizer_names=[c.spec.name for c in comps],
        )
    trained_params = [p for c in comps for p in c.params]
    parked = parked_modules(cfg) if device == "cuda" else ()  # on a CPU run the host is the device
    weights, frozen, states = _resident_bytes(run, cfg, device, parked)
    bucket = largest_bucket(cfg.resolution)
    passes = {} if passes is None else passes
    if (key := pass_key(cfg, opt_file, device)) not in passes:
        passes[key] = run_pass(
            run, cfg, device=device, autocast_dtype=autocast, bucket=bucket, batch_size=cfg.batch_size
        )
    result = passes[key]
    gradients_total = tensor_bytes(trained_params)
    moment = _peak_moment(run, cfg, opt_file, result, gradients_total, device)
    categories = dict.fromkeys(CATEGORIES, 0)
    categories.update(weights=weights, frozen_weights=frozen, optimizer_states=states, **moment)
    ema_shadow = _ema_shadow_bytes(run) if cfg.ema_enabled else 0
    categories["ema"] = ema_shadow if cfg.ema_enabled and cfg.ema_device != "cpu" else 0
    # DDP with gradient_as_bucket_view=True (the builder sets it): every gradient is a view into
    # a flat bucket, all of them allocated from the first backward on, and no copy beside them.
    # What the step's peak does not already count of them stays resident in the buckets.
    categories["ddp_buckets"] = gradients_total - categories["gradients"] if processes > 1 else 0
    sampling, sample_notes = _sampling_bytes(run, cfg, device, autocast, passes, arch)
    notes += sample_notes + _cache_notes(cfg, parked, sampled=sampling > 0)
    if sampling > 0:  # the parked modules are fetched back for the samples
        sampling += sum(module_bytes(getattr(run, name)) for name in parked)
    resident = sum(
        categories[k] for k in ("weights", "frozen_weights", "optimizer_states", "ema", "ddp_buckets")
    )
    # a transient at the step boundary: the peak is max(training, sampling), see sampling.py
    categories["sampling"] = max(0, resident + sampling - sum(categories.values()))
    host = plan_host(
        cfg,
        run,
        device=device,
        device_total=sum(categories.values()),
        ema_shadow=ema_shadow,
        autocast=autocast,
        parked=parked,
    )
    notes += host.notes
    if device == "cuda":
        notes.append(_cuda_estimates(categories))
    step_peak = (
        sum(moment[k] for k in ("gradients", "activations", "transient"))
        if cfg.fused_back_pass
        else result.peak
    )
    sizes = PlanSizes(
        weights=weights,
        frozen_weights=frozen,
        gradients=gradients_total,
        optimizer_states=states,
        saved_activations=result.saved_activations,
        step_peak=step_peak,
        trainable_parameters=sum(p.numel() for p in trained_params),
        sampling=sampling,
    )
    settings = _plan_settings(cfg, run, source=source, device=device, bucket=bucket, autocast=autocast)
    return Evaluation(categories, sizes, settings, tuple(notes), host)


def _resident_bytes(
    run: FakeRun, cfg: TrainConfig, device: str, parked: tuple[str, ...]
) -> tuple[int, int, int]:
    """Trained weights, frozen weights and optimizer states: on the device the whole run (the
    parked frozen modules only while samples are made)."""
    weights = sum(module_bytes(getattr(run, name)) for name in run.trained)
    frozen = sum(
        module_bytes(getattr(run, n))
        for n in ("unet", "text_encoder", "vae")
        if n not in run.trained and n not in parked
    )
    states = _optimizer_state_bytes(run, fused=cfg.fused_back_pass, device=device)
    return weights, frozen, states


def _plan_settings(
    cfg: TrainConfig,
    run: FakeRun,
    *,
    source: str,
    device: str,
    bucket: tuple[int, int],
    autocast: torch.dtype | None,
) -> dict[str, Any]:
    """What the plan was made for, as its report prints it."""
    return {
        "model": source,
        "device": device,
        "bucket": f"{bucket[0]}x{bucket[1]}",
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "trained": list(run.trained),
        "optimizers": {c.name: c.spec.name for c in run.optim.components.values()},
        "autocast": str(autocast).removeprefix("torch.") if autocast else "none (fp32)",
        "dtypes": {k: str(v).removeprefix("torch.") for k, v in run.dtypes.items()},
        **{k: getattr(cfg, k) for k in _OPTION_KEYS},
    }


def _cuda_estimates(categories: dict[str, int]) -> str:
    """Fill in the CUDA context and allocator margin (estimates) and say so."""
    allocated = sum(categories.values())
    categories["cuda_context"] = CUDA_CONTEXT_BYTES + CUDA_LIBRARY_BYTES
    categories["allocator_margin"] = int(ALLOCATOR_MARGIN * allocated)
    return (
        f"CUDA context and library handles ({(CUDA_CONTEXT_BYTES + CUDA_LIBRARY_BYTES) / 2**20:.0f} MiB) and "
        f"allocator margin ({ALLOCATOR_MARGIN:.0%} of the allocated peak) are estimates until "
        "bench/gpu_suite.py measures them"
    )


_OPTION_KEYS = (
    "resolution",
    "cache_latents",
    "gradient_checkpointing",
    "fused_back_pass",
    "weight_dtype",
    "attn_type",
    "channels_last",
)


def _optimizer_state_bytes(run: FakeRun, *, fused: bool, device: str) -> int:
    """Every optimizer's state; the fused back pass builds one optimizer per parameter."""
    total = 0
    for comp in run.optim.components.values():
        options = comp.resolved.options
        shapes = [tuple(p.shape) for p in comp.params]
        per_param = [s for shape in shapes for s in parameter_state(comp.spec, options, shape)]
        shared = [s for shape in shapes for s in shared_state(comp.spec, options, [shape])] if fused else (
            shared_state(comp.spec, options, shapes)
        )  # fmt: skip
        total += state_bytes(per_param + shared, device_only=device == "cuda")
    return total


def _fused_step_bytes(run: FakeRun, cfg: TrainConfig, opt_file: OptimizerFile, device: str) -> list[int]:
    """Working memory of each trained parameter's step inside the fused back pass: its own
    optimizer's update, the rounding of that one parameter (bf16 weights), and the 0-dim
    tensors of the logged gradient norm (`FusedBackward`)."""
    out = []
    for comp in run.optim.components.values():
        for p in comp.params:
            own = optimizer_temporaries(comp.spec, comp.resolved.options, [p.numel()], device=device)
            rounding = 0
            if cfg.weight_dtype == "bf16":
                rounding = rounding_bytes([tuple(p.shape)], adaptive=False, chunk_bytes=None)
            if opt_file.log_grad_norm:
                # FusedBackward's hook: the 0-dim norm of this gradient, its square and the
                # running sum before and after adding it; the sum lives on through the step
                accumulator = 4
                out.append(max(own + rounding + accumulator, 2 * 4 + accumulator))
            else:
                out.append(own + rounding)
    return out


def _peak_moment(
    run: FakeRun,
    cfg: TrainConfig,
    opt_file: OptimizerFile,
    result: PassResult,
    gradients_total: int,
    device: str,
) -> dict[str, int]:
    """gradients / activations / transient at the worst moment of the step (module docstring)."""
    if cfg.fused_back_pass:
        params = [p for comp in run.optim.components.values() for p in comp.params]
        peak, grad, step = result.fused_peak(
            _fused_step_bytes(run, cfg, opt_file, device), [p.numel() * p.element_size() for p in params]
        )
        return {"gradients": grad, "activations": peak - grad - step, "transient": step}
    moments = [
        {
            "gradients": result.gradients_at_peak,
            "activations": result.peak - result.gradients_at_peak,
            "transient": 0,
        },
        {
            "gradients": result.end_gradients,
            "activations": result.end_live - result.end_gradients,
            "transient": _step_transient(run, cfg, device),
        },
    ]
    if cfg.grad_accum > 1:  # a later micro-batch's backward runs on top of every gradient
        moments.append(
            {"gradients": gradients_total, "activations": result.peak_without_gradients, "transient": 0}
        )
    return max(moments, key=lambda m: sum(m.values()))


def _step_transient(run: FakeRun, cfg: TrainConfig, device: str) -> int:
    """The largest working memory of a component's optimizer step (they step one after another)."""
    largest = 0
    for comp in run.optim.components.values():
        numels = [p.numel() for p in comp.params]
        own = optimizer_temporaries(comp.spec, comp.resolved.options, numels, device=device)
        rounding = 0
        if cfg.weight_dtype == "bf16":
            rounding = rounding_bytes(
                [tuple(p.shape) for p in comp.params],
                adaptive=comp.spec.adaptive,
                chunk_bytes=DEFAULT_ROUNDING_CHUNK_BYTES,
            )
        granularity = CUDA_ALLOCATION_GRANULARITY if device == "cuda" else 1
        largest = max(largest, own + rounding + gradient_norm_bytes(len(numels), granularity))
    return largest


def _sampling_bytes(
    run: FakeRun, cfg: TrainConfig, device: str, autocast, passes: dict, arch
) -> tuple[int, list[str]]:
    """Working memory of the largest sample call (sampling.py), remembered in `passes` by what
    it depends on: the architecture, the modules' dtypes, attention, autocast and the call."""
    call, notes = largest_sample_call(cfg)
    if call is None:
        return 0, notes
    key = json.dumps(
        [
            "sampling",
            arch_key(arch),
            {k: str(v) for k, v in run.dtypes.items()},
            cfg.attn_type,
            str(autocast),
            device,
            call.key,
        ]
    )
    if key not in passes:
        passes[key] = sampling_working_bytes(run, call, device=device, autocast_dtype=autocast)
    return passes[key] + ema_swap_bytes(run, cfg), notes


def _cache_notes(cfg: TrainConfig, parked: tuple[str, ...], *, sampled: bool) -> list[str]:
    """What the plan assumes of the caches and of the modules trainer/parts/parking.py keeps on
    the host."""
    notes = []
    if cfg.cache_text_encoder_outputs:
        notes.append(
            "cache_text_encoder_outputs: the frozen text encoder's forward is planned in the step "
            "(an upper bound: the run encodes fixed captions at start-up)"
        )
    if parked:
        where = "counted in sampling, which fetches them" if sampled else "no samples fetch them"
        note = f"{' and '.join(parked)} on the host between samples (outputs cached; {where})"
        if "text_encoder" in parked:
            note += "; the text encoder stays on the device if a folder turns shuffle_tags on"
        notes.append(note)
    return notes


def _ema_shadow_bytes(run: FakeRun) -> int:
    """The EMA's shadow weights and buffers (wherever they live: the device plan counts them
    with ema_device device, the host plan with ema_device cpu)."""
    modules: dict[str, torch.nn.Module] = {"unet": run.unet}
    if "text_encoder" in run.trained:
        modules["text_encoder"] = run.text_encoder
    with _quiet(PARTS_LOGGER):
        ema = EMA(modules, decay=0.9, update_interval=1, device="cpu")
    return tensor_bytes(
        [t for group in (ema.shadow, ema.buffers) for d in group.values() for t in d.values()]
    )
