"""The planning pass: one real training micro-step, forward and backward, on shadow tensors.

The run's own `TrainingStep` (built as `trainer.parts.builder` builds it) computes the loss of a
batch of the largest bucket, and the loop's backward follows, on the shadow model of
`fake_model.py` (shadow tensors: shadow.py). Nothing is allocated, but every tensor an operator makes is counted while it
lives (`tracker.LiveBytes`), and what autograd saves is counted apart (`tracker.SavedBytes`).
Gradient checkpointing, autocast, the attention kernel, a trained or frozen text encoder, the
VAE encode of pixels, masks: all are whatever the real step does, because it is the real step.

The fused back pass needs no pass of its own: it differs only in freeing each gradient right
after its parameter's optimizer step, so the pass notes what else is alive when each gradient
is complete (`PassResult.fused_peak`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config import TrainConfig
from trainer.data.batch import Batch
from trainer.plan.fake_model import FakeRun
from trainer.plan.shadow import shadow_zeros
from trainer.plan.tracker import LiveBytes, SavedBytes, ShadowLiveBytes
from trainer.step.diffusion import NoiseSchedule
from trainer.step.training_step import StepSettings, TrainingStep

CUDA_ALLOCATION_GRANULARITY = 512  # the CUDA caching allocator rounds every block up to 512 bytes


@dataclass(frozen=True)
class PassResult:
    """What one planning pass measured (bytes).

    `gradient_events[i]` is, for the i-th trained parameter (optimizer order), the live bytes
    other than parameter gradients at the moment its gradient was complete: the fused back pass
    steps that parameter then and frees its gradient, so its peak follows from these without a
    pass of its own (`fused_peak`)."""

    saved_activations: int  # saved for backward at the end of the forward (parameters excluded)
    peak: int  # largest live total over forward and backward
    gradients_at_peak: int  # parameter gradients among `peak`
    peak_without_gradients: int  # largest live total of everything but parameter gradients
    end_live: int  # live after the backward (the gradients, and what the optimizer step sees)
    end_gradients: int
    gradient_events: tuple[int, ...]

    def fused_peak(self, step_bytes: list[int], gradient_bytes: list[int]) -> tuple[int, int, int]:
        """(peak, gradients, transient at it) with the fused back pass: each parameter's gradient
        lives until its optimizer step, whose working memory is `step_bytes[i]`."""
        best = (self.peak_without_gradients, 0, 0)
        for other, grad, step in zip(self.gradient_events, gradient_bytes, step_bytes, strict=True):
            if other + grad + step > best[0]:
                best = (other + grad + step, grad, step)
        return best


def planning_batch(
    cfg: TrainConfig, vae_config, bucket: tuple[int, int], batch_size: int, zeros=torch.zeros
) -> Batch:
    """A batch of the largest bucket with captions of the longest allowed length (the most
    text-encoder chunks), as the loader yields it: latents when cached, else pixels. `zeros`
    makes its tensors (shadows in the planning pass)."""
    width, height = bucket
    caption = " ".join(["photo"] * cfg.max_token_length)
    latents = pixels = None
    if cfg.cache_latents:
        channels = vae_config.latent_channels
        factor = 2 ** (len(vae_config.block_out_channels) - 1)
        latents = zeros(batch_size, channels, height // factor, width // factor)
    else:
        pixels = zeros(batch_size, 3, height, width)
    # the mask's values do not change the bytes
    masks = zeros(batch_size, 1, height, width) if cfg.masked_loss else None
    return Batch(
        [caption] * batch_size, list(range(batch_size)), latents=latents, pixel_values=pixels, masks=masks
    )


def run_pass(
    run: FakeRun,
    cfg: TrainConfig,
    *,
    device: str,
    autocast_dtype: torch.dtype | None,
    bucket: tuple[int, int],
    batch_size: int,
) -> PassResult:
    """Forward and backward of one micro-batch on `run` (see the module docstring)."""
    trained = [p for comp in run.optim.components.values() for p in comp.params]
    every_param = [p for m in (run.unet, run.text_encoder, run.vae) for p in m.parameters()]
    live = ShadowLiveBytes(granularity=CUDA_ALLOCATION_GRANULARITY if device == "cuda" else 1)
    saved = SavedBytes(exclude=every_param)
    events: dict[int, int] = {}
    handles = [
        p.register_post_accumulate_grad_hook(_grad_hook(live, events, i)) for i, p in enumerate(trained)
    ]
    # built before counting, as the run builds it once (its noise schedule)
    step = TrainingStep(
        unet=run.unet,
        text_encoder=run.text_encoder,
        vae=run.vae,
        tokenizer=run.tokenizer,
        schedule=NoiseSchedule.from_scheduler_config(
            run.scheduler_config,
            zero_terminal_snr=cfg.enable_zero_terminal_snr,
            prediction_type=cfg.prediction_type,
        ),
        settings=StepSettings.from_config(cfg),
        device="cpu",  # shadow CPU tensors; emulation.py gives them CUDA's differences
        autocast_dtype=autocast_dtype,
        channels_last=cfg.channels_last,
    )
    try:
        with live:
            batch = planning_batch(cfg, run.vae.config, bucket, batch_size, zeros=shadow_zeros)
            with saved.recording():
                out = step(batch)
            loss = out.loss.sum() / batch_size
            del out, batch
            loss.backward()
            del loss
            end_live, end_gradients = live.live, live.live_gradients
    finally:
        for handle in handles:
            handle.remove()
        for p in trained:
            p.grad = None
    return PassResult(
        saved_activations=saved.total,
        peak=live.peak.total,
        gradients_at_peak=live.peak.gradients,
        peak_without_gradients=live.peak_other,
        end_live=end_live,
        end_gradients=end_gradients,
        gradient_events=tuple(events[i] for i in range(len(trained))),
    )


def _grad_hook(live: LiveBytes, events: dict[int, int], index: int):
    def hook(param: torch.nn.Parameter) -> None:
        assert param.grad is not None  # a post-accumulate-grad hook runs once the gradient exists
        live.mark_gradient(param.grad)
        events[index] = live.live - live.live_gradients

    return hook
