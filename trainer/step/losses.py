"""Loss weightings beyond the peers' defaults: masked loss (OneTrainer, kohya) and debiased
estimation (kohya). Pure tensor functions; docs/CONFIG.md gives each formula's source.

Masked loss: a mask in [0, 1] per pixel (white = learn this) becomes a weight per latent
element. The image-resolution mask is reduced to the latent grid by area averaging (kohya's
`interpolate(mode="area")`), so a latent cell half covered by the mask weighs half. OneTrainer's
rule then keeps a floor: `w = max(mask, unmasked_weight)`, so the background still trains a
little (unmasked_weight 0 ignores it; 1 turns masking off). With normalisation each sample's
loss is divided by its mean weight, so a small subject is not trained more weakly than a big one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# kohya caps SNR here before 1/sqrt(SNR): at t = 0 the SNR is ~1e4 on SD's schedule and grows
# without bound on others; the cap keeps the weight of the cleanest steps at >= 1/sqrt(1000).
DEBIASED_SNR_CAP = 1000.0
# A sample whose weights are all 0 (all-black mask, unmasked_weight 0) has loss 0; dividing by
# its mean weight 0 would make it NaN, so the mean is floored (0 / floor = 0).
_WEIGHT_MEAN_FLOOR = 1e-12


def debiased_weight(snr_values: Tensor, prediction_type: str) -> Tensor:
    """Debiased estimation loss weight per sample (Yu et al. 2023, arXiv 2310.08442; kohya's
    debiased_estimation_loss): 1/sqrt(SNR) for epsilon, 1/(SNR + 1) for v-prediction, with SNR
    capped at DEBIASED_SNR_CAP first, as kohya does. It undoes the epsilon loss's bias toward
    low-noise steps (whose targets are nearly free to predict)."""
    s = torch.clamp(snr_values.to(torch.float32), max=DEBIASED_SNR_CAP)
    if prediction_type == "v_prediction":
        return 1.0 / (s + 1.0)
    return 1.0 / torch.sqrt(s)


def latent_weight_map(masks: Tensor, latent_size: tuple[int, int], unmasked_weight: float) -> Tensor:
    """Masks [B, 1, H, W] in [0, 1] (image or latent resolution) -> weights [B, 1, h, w], float32.

    Area averaging to the latent grid, then OneTrainer's floor `max(mask, unmasked_weight)`.
    An all-white mask gives exactly 1 everywhere (a mean of ones is 1), so masked training
    with full masks is bitwise the unmasked run.
    """
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be [B, 1, H, W], got {tuple(masks.shape)}")
    m = masks.to(torch.float32)
    if tuple(m.shape[2:]) != tuple(latent_size):
        m = F.interpolate(m, size=tuple(latent_size), mode="area")
    return torch.clamp(m, min=float(unmasked_weight), max=1.0)


def masked_mean(elementwise: Tensor, weight_map: Tensor, *, normalize: bool) -> Tensor:
    """Per-sample mean of `elementwise * weight_map` (broadcast over channels) -> [B].

    With `normalize`, divided by the sample's mean weight (OneTrainer's normalize_masked_area_loss).
    """
    weights = weight_map.to(device=elementwise.device, dtype=elementwise.dtype)
    dims = tuple(range(1, elementwise.ndim))
    out = (elementwise * weights).mean(dim=dims)
    if normalize:
        out = out / weights.mean(dim=dims).clamp(min=_WEIGHT_MEAN_FLOOR)
    return out


def combine_weights(*weights: Tensor | None) -> Tensor | None:
    """The product of the per-sample weights that are set (None when none is)."""
    out = None
    for w in weights:
        if w is not None:
            out = w if out is None else out * w
    return out
