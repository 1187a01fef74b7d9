"""Extract a LoRA from a base and a tuned model, layer by layer.

`extract_lora(base, tuned, settings)` checks that both are the same architecture (naming the
first key whose presence or shape differs), finds every layer kohya's network covers
(`naming`), and for each one that changed: moves that one layer's change to the SVD device,
decomposes it in fp32, picks its rank (fixed, or the smallest keeping `keep` of its energy,
capped) and keeps the factors on the CPU. Memory on the device is one layer at a time.

A layer counts as unchanged when the tuned weight equals the base, or equals the base rounded
to fp16 or bf16: a fine-tune saved in half precision holds exactly that for every layer it did
not train, and a LoRA of that rounding would be noise (kohya filters the same case with a
threshold, `min_diff`, which also drops small real changes; this test drops none).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from trainer.export.lora import (
    decompose,
    factors,
    kept_energy,
    rank_for_energy,
    rank_limit,
    rescaled_for_alpha,
)
from trainer.export.naming import CONV, TEXT_ENCODER, UNET, LoraTarget, text_encoder_targets, unet_targets
from trainer.runtime.errors import TrainerError

logger = logging.getLogger(__name__)

COMPONENTS = (UNET, TEXT_ENCODER)
# Ranks whose kept energy every extraction also reports (from the same SVDs, at no extra cost),
# so one run says what a smaller or larger file would keep.
RANK_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ArchitectureMismatchError(TrainerError):
    """Base and tuned model are not the same architecture: no LoRA relates them."""


class IdenticalModelsError(TrainerError):
    """The tuned model's weights are the base's: there is nothing to extract."""


@dataclass(frozen=True)
class RankSettings:
    """How many singular values each layer keeps.

    `rank` applies to linears and 1x1 convolutions, `conv_rank` to k x k convolutions (0 leaves
    them out). With `keep`, each layer takes the smallest rank whose singular values keep that
    fraction of its change (Frobenius), and `rank` / `conv_rank` are the caps.
    """

    rank: int
    conv_rank: int = 0
    keep: float | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.conv_rank < 0:
            raise ValueError(f"conv_rank must be 0 (no conv layers) or more, got {self.conv_rank}")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")

    def cap(self, target: LoraTarget) -> int:
        return self.conv_rank if target.kind == CONV else self.rank


@dataclass(frozen=True)
class LayerResult:
    """One extracted layer: its rank (and what was asked for), its change's energy and what the
    rank keeps of it."""

    target: LoraTarget
    rank: int
    requested: int  # the cap or fixed rank asked for, before clamping to the layer's limit
    limit: int  # the layer's full rank
    energy: float  # ||delta||_F^2
    kept: float  # squared singular values kept

    @property
    def clamped(self) -> bool:
        return self.requested > self.limit


@dataclass
class ExtractedLora:
    """The extraction in memory: fp32 factors under kohya keys, and what each layer kept."""

    settings: RankSettings
    family: str
    tensors: dict[str, torch.Tensor]  # {lora_name}.lora_up.weight / .lora_down.weight / .alpha
    layers: list[LayerResult]
    unchanged: list[LoraTarget]  # covered layers the fine-tune did not change
    # ||delta||^2 of parameters the file carries nothing of (biases, norms, embeddings,
    # conv_in/out, time embedding, and k x k convs when conv_rank is 0), by parameter name
    uncarried: dict[str, float] = field(default_factory=dict)
    alpha: float = 0.0  # the file's one alpha (the largest rank written)
    # squared singular values the written layers would keep at each RANK_LADDER rank (every
    # layer at min(rank, its full rank))
    kept_at: dict[int, float] = field(default_factory=lambda: dict.fromkeys(RANK_LADDER, 0.0))

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if any(r.target.component == c for r in self.layers)]

    def targets(self) -> list[LoraTarget]:
        return [r.target for r in self.layers]


def is_unchanged(base: torch.Tensor, tuned: torch.Tensor) -> bool:
    """True when `tuned` is `base`, or `base` rounded to fp16 or bf16 (see the module docstring)."""
    tuned = tuned.to(base.device)  # the checkpoint writer's tuned model may be on the GPU
    if torch.equal(base, tuned):
        return True
    base32 = base.float()
    tuned32 = tuned.float()
    return any(torch.equal(base32.to(half).float(), tuned32) for half in (torch.float16, torch.bfloat16))


def check_same_architecture(base, tuned) -> None:
    """Raise ArchitectureMismatchError naming the first key whose presence or shape differs."""
    if base.family != tuned.family:
        raise ArchitectureMismatchError(
            f"the base is {base.family.upper()} ({base.source}) and the tuned model {tuned.family.upper()} "
            f"({tuned.source}); give the model the fine-tune started from as --base"
        )
    for component in COMPONENTS:
        a = getattr(base, component).state_dict()
        b = getattr(tuned, component).state_dict()
        for key in sorted(a.keys() | b.keys()):
            shape_a = tuple(a[key].shape) if key in a else "missing"
            shape_b = tuple(b[key].shape) if key in b else "missing"
            if shape_a != shape_b:
                raise ArchitectureMismatchError(
                    f"base and tuned model differ in architecture: {component} key {key!r} is "
                    f"{shape_a} in the base ({base.source}) and {shape_b} in the tuned model "
                    f"({tuned.source}); give the model the fine-tune started from as --base"
                )


def covered_targets(model, settings: RankSettings) -> list[LoraTarget]:
    """Every layer this extraction may write, UNet first, in module order."""
    return unet_targets(model.unet, include_conv=settings.conv_rank > 0) + text_encoder_targets(
        model.text_encoder
    )


def extract_lora(
    base, tuned, settings: RankSettings, *, device: str = "cpu", progress: bool = True
) -> ExtractedLora:
    """Decompose every changed covered layer (see the module docstring); -> ExtractedLora.

    `base` / `tuned` are SDComponents (anything with .unet, .text_encoder, .family, .source).
    Raises ArchitectureMismatchError, and IdenticalModelsError when no parameter changed.
    """
    check_same_architecture(base, tuned)
    targets = covered_targets(base, settings)
    params = {c: dict(getattr(base, c).named_parameters()) for c in COMPONENTS}
    tuned_params = {c: dict(getattr(tuned, c).named_parameters()) for c in COMPONENTS}
    result = ExtractedLora(settings, base.family, {}, [], [])
    for target in tqdm(targets, desc="SVD", unit="layer", disable=not progress):
        base_w = params[target.component][target.weight_key].detach()
        tuned_w = tuned_params[target.component][target.weight_key].detach()
        if is_unchanged(base_w, tuned_w):
            result.unchanged.append(target)
            continue
        delta = tuned_w.to(device=device, dtype=torch.float32) - base_w.to(device=device, dtype=torch.float32)
        _add_layer(result, target, delta, device)
    covered = {(t.component, t.weight_key) for t in targets}
    result.uncarried = _uncarried_energy(params, tuned_params, covered)
    if not result.layers:
        raise IdenticalModelsError(_nothing_to_extract(base, tuned, result.uncarried))
    _set_alpha(result)
    _log_clamped(result.layers)
    return result


def _set_alpha(result: ExtractedLora) -> None:
    """One alpha for the file, the largest rank written (lora.py says why); every layer's
    factors are restated for it, so each layer's change is unchanged."""
    result.alpha = float(max(r.rank for r in result.layers))
    for r in result.layers:
        up_key, down_key = f"{r.target.lora_name}.lora_up.weight", f"{r.target.lora_name}.lora_down.weight"
        up, down = rescaled_for_alpha(result.tensors[up_key], result.tensors[down_key], result.alpha)
        result.tensors[up_key], result.tensors[down_key] = up, down
        result.tensors[f"{r.target.lora_name}.alpha"] = torch.tensor(result.alpha)


def _nothing_to_extract(base, tuned, uncarried: dict[str, float]) -> str:
    if not uncarried:
        return (
            f"the tuned model ({tuned.source}) has the same weights as the base ({base.source}): "
            "there is no fine-tune to extract; nothing was written"
        )
    names = ", ".join(sorted(uncarried)[:4])
    return (
        f"the tuned model ({tuned.source}) differs from the base only in parameters a LoRA file has no "
        f"key for ({len(uncarried)}, e.g. {names}); nothing was written. k x k convolutions are carried "
        "with --conv_rank > 0; biases, norms and embeddings never are"
    )


def _add_layer(result: ExtractedLora, target: LoraTarget, delta: torch.Tensor, device: str) -> None:
    spectrum = decompose(delta, device)
    limit = rank_limit(target.shape)
    requested = result.settings.cap(target)
    rank = min(requested, limit)
    if result.settings.keep is not None:
        rank = min(rank, rank_for_energy(spectrum.s, result.settings.keep))
    up, down = factors(spectrum, rank, target.shape)
    result.tensors[f"{target.lora_name}.lora_up.weight"] = up
    result.tensors[f"{target.lora_name}.lora_down.weight"] = down
    result.layers.append(
        LayerResult(target, rank, requested, limit, spectrum.energy, kept_energy(spectrum.s, rank))
    )
    for ladder_rank in RANK_LADDER:
        result.kept_at[ladder_rank] += kept_energy(spectrum.s, min(ladder_rank, limit))


def _uncarried_energy(params: dict, tuned_params: dict, covered: set) -> dict[str, float]:
    out = {}
    for component in COMPONENTS:
        for key, base_p in params[component].items():
            if (component, key) in covered:
                continue
            tuned_p = tuned_params[component][key].detach()
            if not is_unchanged(base_p.detach(), tuned_p):
                delta = tuned_p.double().cpu() - base_p.detach().double().cpu()
                out[f"{component}.{key}"] = float((delta**2).sum())
    return out


def _log_clamped(layers: list[LayerResult]) -> None:
    clamped = [r for r in layers if r.clamped]
    if clamped:
        examples = ", ".join(f"{r.target.lora_name} ({r.limit})" for r in clamped[:3])
        logger.warning(
            "%d layer(s) are smaller than the rank asked for and keep their full rank instead, e.g. %s; "
            "at full rank such a layer is carried exactly",
            len(clamped),
            examples,
        )
