"""The maths of LoRA extraction: pure functions of one layer's weight change.

A layer's change D = W_tuned - W_base is a matrix (out, in) for a linear or 1x1 convolution and
(out, in * k * k) for a k x k convolution (LoCon flattens the kernel into the input side, so
the `down` factor is itself a k x k convolution and `up` a 1x1). Its best rank-r approximation
in the Frobenius norm is the truncated SVD (Eckart-Young), so the fraction of ||D||_F^2 a rank
keeps is the share of the squared singular values it keeps: that one number says how much of
the fine-tune a rank carries, layer by layer.

The factors split each singular value evenly (up = U sqrt(S), down = sqrt(S) Vh) rather than
putting it all in `up` as kohya does: the product is the same for every loader, and the two
factors have similar magnitudes, so fp16 / bf16 storage loses the least.

Loaders scale each layer by alpha / rank. One alpha serves the whole file (`rescaled_for_alpha`
folds sqrt(rank / alpha) into both factors of a layer whose rank differs): diffusers (0.42)
maps the per-layer alphas of kohya attention keys to names that match no module, so a file
whose alphas differ from layer to layer loads there with wrong scales on those layers; with
one alpha in the file, every loader (kohya, A1111, ComfyUI, diffusers) applies the same change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Spectrum:
    """Thin SVD of one layer's change, in fp32 on the device it was computed on."""

    u: torch.Tensor  # (out, k)
    s: torch.Tensor  # (k,), descending
    vh: torch.Tensor  # (k, in * kh * kw)

    @property
    def energy(self) -> float:
        """||D||_F^2, the sum of the squared singular values."""
        return float((self.s.double() ** 2).sum())


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """(out, in) for a linear, (out, in * kh * kw) for a convolution (LoCon's flattening)."""
    return delta.reshape(delta.shape[0], -1)


def rank_limit(shape: tuple[int, ...]) -> int:
    """The largest rank a layer of this weight shape has: min(out, in * kh * kw)."""
    return min(shape[0], math.prod(shape[1:]))


def decompose(delta: torch.Tensor, device: torch.device | str = "cpu") -> Spectrum:
    """SVD of a layer's change in fp32 on `device` (only this layer is moved there)."""
    matrix = as_matrix(delta).to(device=device, dtype=torch.float32)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return Spectrum(u, s, vh)


def kept_energy(s: torch.Tensor, rank: int) -> float:
    """Sum of the squared singular values a rank-`rank` approximation keeps."""
    return float((s[:rank].double() ** 2).sum())


def rank_for_energy(s: torch.Tensor, keep: float) -> int:
    """The smallest rank whose singular values keep at least `keep` of the layer's ||D||_F^2
    (0 for a zero change)."""
    squared = s.double() ** 2
    total = float(squared.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(squared, 0) / total
    # the last entry is 1 up to rounding: never ask for more than the layer has
    return min(int(torch.searchsorted(cumulative, torch.tensor(keep, dtype=torch.float64))) + 1, len(s))


def factors(
    spectrum: Spectrum, rank: int, weight_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of a rank-`rank` LoRA in the layer's own layout, fp32 on the CPU.

    Linear: up (out, r), down (r, in). Convolution: up (out, r, 1, 1), down (r, in, kh, kw),
    the shapes kohya's LoRAModule gives its lora_up / lora_down modules.
    """
    root = spectrum.s[:rank].sqrt()
    up = spectrum.u[:, :rank] * root
    down = root[:, None] * spectrum.vh[:rank]
    if len(weight_shape) == 4:
        up = up.reshape(weight_shape[0], rank, 1, 1)
        down = down.reshape(rank, *weight_shape[1:])
    return up.cpu().contiguous(), down.cpu().contiguous()


def weight_delta(up: torch.Tensor, down: torch.Tensor, alpha: float) -> torch.Tensor:
    """The change a loader adds to the base weight: (alpha / rank) * up @ down, in the weight's
    shape (what kohya's merge_to, ComfyUI's LoRAAdapter and diffusers' fuse all compute)."""
    rank = down.shape[0]
    product = up.reshape(up.shape[0], rank).float() @ down.reshape(rank, -1).float()
    return (alpha / rank) * product.reshape(up.shape[0], *down.shape[1:])


def rescaled_for_alpha(
    up: torch.Tensor, down: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of a scale-1 LoRA layer (alpha = rank) restated for `alpha`: the change
    (alpha / rank) * up @ down stays the same, and both factors keep similar magnitudes."""
    factor = math.sqrt(down.shape[0] / alpha)
    return up * factor, down * factor
