"""When a recipe does not fit: the cheapest changes that make it fit, each re-planned.

The changes are tried in order of their speed cost (docs/PERFORMANCE.md measured each on CPU;
the costs quoted are those figures): the latent cache (a speed-up), 8-bit optimizer states,
gradient checkpointing, the fused back pass, bf16 weights, then a smaller micro-batch with more
`grad_accum` so the effective batch stays the same. Each change is applied on top of the ones
before it and the whole recipe planned again, so what a change saves is measured in the
recipe it joins, not assumed. The advice stops at the first recipe that fits; a change the
recipe rules out (fused back pass with Prodigy, bf16 weights with fp16) is reported as skipped,
with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainer.config import TrainConfig
from trainer.optim import OptimizerFile
from trainer.optim.registry import REGISTRY, get_spec, normalize_name
from trainer.optim.schema import DEFAULT_OPTIMIZER
from trainer.plan.model import Change, Skipped
from trainer.runtime.errors import ConfigError

# Measured speed costs (docs/PERFORMANCE.md, 2-core CPU, builtin:tiny-sd1; GPU figures pending).
SPEED_COSTS = {
    "cache_latents": "faster: 1.25x per step at 128 px (the VAE encode is gone); no crop jitter",
    "8-bit optimizer states": "CPU 1.6x slower per step (bitsandbytes' CPU kernels); a fused kernel on GPU",
    "gradient_checkpointing": "0.70x speed (the forward is recomputed in backward)",
    "fused_back_pass": "0.57x speed on CPU (one optimizer call per parameter)",
    "weight_dtype bf16": "0.49x on a CPU without bf16 arithmetic; native on GPUs",
    "smaller micro-batch": "fewer images per second (batch 1: 5.0 vs batch 4: 11.5 images/s)",
}

Recipe = tuple[TrainConfig, OptimizerFile]
Planner = Callable[[TrainConfig, OptimizerFile], int]  # -> total bytes


@dataclass(frozen=True)
class Candidate:
    name: str
    apply: Callable[[TrainConfig, OptimizerFile], Recipe | str]  # a new recipe, or why not


def optimizer_names(opt_file: OptimizerFile) -> dict[str, str]:
    """The optimizer each optimizer.json section names (the text encoder's may inherit base's)."""
    base = normalize_name(opt_file.base.optimizer or DEFAULT_OPTIMIZER)
    te = opt_file.text_encoder_overrides.optimizer if opt_file.text_encoder_overrides else None
    return {"base": base, "text_encoder_overrides": normalize_name(te) if te else base}


def eight_bit_variant(name: str) -> str | None:
    """The 8-bit sibling of an optimizer in the registry (adamw -> adamw8bit), or None."""
    spec = get_spec(name)
    if spec.eight_bit:
        return None
    candidate = f"{spec.name}8bit"
    return candidate if candidate in REGISTRY else None


def with_optimizers(opt_file: OptimizerFile, names: dict[str, str]) -> OptimizerFile:
    """`opt_file` with sections switched to other optimizers; keys the new one does not take
    are cleared (e.g. torch's `fused`), the rest of each section stays."""
    updates: dict[str, Any] = {}
    for section_name, new in names.items():
        section = getattr(opt_file, section_name)
        if section is None:
            continue
        accepted = set(get_spec(new).accepted_keys)
        cleared = {k: None for k, v in section.model_dump().items() if v is not None and k not in accepted}
        updates[section_name] = section.model_copy(update={**cleared, "optimizer": new})
    return opt_file.model_copy(update=updates)


def _cache_latents(cfg: TrainConfig, opt: OptimizerFile) -> Recipe | str:
    return "already on" if cfg.cache_latents else (cfg.model_copy(update={"cache_latents": True}), opt)


def _eight_bit(cfg: TrainConfig, opt: OptimizerFile) -> Recipe | str:
    names = optimizer_names(opt)
    switched = {s: v for s, n in names.items() if (v := eight_bit_variant(n))}
    if not switched:
        return f"no 8-bit variant of {', '.join(sorted(set(names.values())))}"
    if opt.text_encoder_overrides is None or opt.text_encoder_overrides.optimizer is None:
        switched.pop("text_encoder_overrides", None)  # inherits base's
    return cfg, with_optimizers(opt, switched)


def _checkpointing(cfg: TrainConfig, opt: OptimizerFile) -> Recipe | str:
    if cfg.gradient_checkpointing:
        return "already on"
    return cfg.model_copy(update={"gradient_checkpointing": True}), opt


def _fused(cfg: TrainConfig, opt: OptimizerFile) -> Recipe | str:
    if cfg.fused_back_pass:
        return "already on"
    problems = []
    if cfg.grad_accum != 1:
        problems.append(f"grad_accum is {cfg.grad_accum} (it needs 1)")
    if cfg.clip_grad_norm is not None:
        problems.append("clip_grad_norm is set")
    if cfg.mixed_precision == "fp16" and not cfg.disable_amp:
        problems.append("mixed_precision fp16 needs a GradScaler")
    for name in set(optimizer_names(opt).values()):
        spec = get_spec(name)
        if spec.adaptive or spec.schedule_free:
            problems.append(f"optimizer {spec.name} steps all parameters together")
    if problems:
        return "; ".join(problems)
    return cfg.model_copy(update={"fused_back_pass": True}), opt


def _bf16_weights(cfg: TrainConfig, opt: OptimizerFile) -> Recipe | str:
    if cfg.weight_dtype == "bf16":
        return "already on"
    if cfg.mixed_precision == "fp16" and not cfg.disable_amp:
        return "mixed_precision fp16 would compute in fp16 on bf16 weights (use bf16)"
    return cfg.model_copy(update={"weight_dtype": "bf16"}), opt


CANDIDATES = (
    Candidate("cache_latents", _cache_latents),
    Candidate("8-bit optimizer states", _eight_bit),
    Candidate("gradient_checkpointing", _checkpointing),
    Candidate("fused_back_pass", _fused),
    Candidate("weight_dtype bf16", _bf16_weights),
)


def smaller_micro_batches(cfg: TrainConfig) -> list[TrainConfig] | list[str]:
    """Micro-batch sizes below the current one that keep batch_size x grad_accum, largest first."""
    if cfg.batch_size == 1:
        return []
    if cfg.fused_back_pass:
        return [
            "fused_back_pass needs grad_accum 1, so the micro-batch cannot shrink without shrinking the batch"
        ]
    effective = cfg.batch_size * cfg.grad_accum
    sizes = [b for b in range(cfg.batch_size - 1, 0, -1) if effective % b == 0]
    return [cfg.model_copy(update={"batch_size": b, "grad_accum": effective // b}) for b in sizes]


def advise(
    cfg: TrainConfig, opt_file: OptimizerFile, total: int, budget: int, plan_total: Planner
) -> tuple[list[Change], list[Skipped], bool]:
    """Apply the candidates in order until the recipe fits `budget` (see the module docstring).
    Returns the changes made, those skipped (with why), and whether the result fits."""
    changes: list[Change] = []
    skipped: list[Skipped] = []
    for candidate in CANDIDATES:
        if total <= budget:
            break
        outcome = candidate.apply(cfg, opt_file)
        if isinstance(outcome, str):
            if outcome != "already on":
                skipped.append(Skipped(candidate.name, outcome))
            continue
        try:
            new_total = plan_total(*outcome)
        except ConfigError as exc:  # the trainer would refuse the changed recipe: say why
            skipped.append(Skipped(candidate.name, str(exc)))
            continue
        if new_total >= total:
            skipped.append(Skipped(candidate.name, "saves nothing in this recipe"))
            continue
        changes.append(_change(candidate.name, (cfg, opt_file), outcome, total, new_total))
        (cfg, opt_file), total = outcome, new_total
    for smaller in smaller_micro_batches(cfg) if total > budget else []:
        if isinstance(smaller, str):
            skipped.append(Skipped("smaller micro-batch", smaller))
            break
        new_total = plan_total(smaller, opt_file)
        if new_total <= budget or smaller.batch_size == 1:
            changes.append(
                _change("smaller micro-batch", (cfg, opt_file), (smaller, opt_file), total, new_total)
            )
            total = new_total
            break
    return changes, skipped, total <= budget


def _change(name: str, before: Recipe, after: Recipe, total: int, new_total: int) -> Change:
    (cfg0, opt0), (cfg1, opt1) = before, after
    keys = {k: v for k, v in cfg1.model_dump().items() if cfg0.model_dump()[k] != v}
    old_opt, new_opt = optimizer_names(opt0), optimizer_names(opt1)
    optimizers = {k: v for k, v in new_opt.items() if old_opt[k] != v} or None
    return Change(name, keys, optimizers, total - new_total, new_total, SPEED_COSTS[name])
