"""The sampling moment: what the device holds while samples are generated, at the step boundary.

Samples (trainer/eval/sampling.py) are generated between optimizer steps, after the gradients
were freed (`zero_grad(set_to_none=True)`). So sampling is a transient *at the step boundary*:
what stays resident then (weights, frozen modules, optimizer states, the EMA and DDP buckets
on the device) plus the pipeline's working memory. It never coexists with the step's
activations or gradients, so the run's peak is `max(training peak, sampling peak)`, not their
sum. The plan's `sampling` category is the excess of the sampling moment over the training
moment (0 when training's peak is higher): the categories still add up to the total, and the
total follows the max rule.

The working memory is measured on the shadow model, as the training pass is (`tracker.LiveBytes`
under `torch.no_grad` and the run's autocast), for the largest pipeline call of the sample file
(its batch, its size, classifier-free guidance doubling the UNet's batch when cfg > 1):

* the text encoder's forward on the prompts (and negative prompts), whose embeddings stay alive;
* one denoising step: the UNet forward on the latents (every step is the same size) plus the
  scheduler's latent-size working tensors;
* the VAE decode of the final latents into images, and the pipeline's fp32 post-processing.

With `ema_device: device` and EMA samples, `EMA.swapped_in` backs the live trained weights up on
the device while the EMA weights are in the modules: that copy is counted too.

Validation (trainer/eval/validation.py) runs the training step's forward under no_grad on
batches of the training buckets: its live tensors are a subset of what the training forward
holds at the same batch (nothing is saved for a backward), so the training peak covers it when
the validation batch is not larger than the training batch (the default).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from trainer.config import TrainConfig
from trainer.plan.activations import CUDA_ALLOCATION_GRANULARITY
from trainer.plan.fake_model import FakeRun
from trainer.plan.shadow import shadow_zeros
from trainer.plan.tracker import ShadowLiveBytes
from trainer.runtime.errors import TrainerError

log = logging.getLogger(__name__)

TEXT_TOKENS = 77  # the pipeline pads every prompt to the tokenizer's 77 tokens
SCHEDULER_LATENT_COPIES = 3  # the scheduler's step: model output, previous sample, the new latents


@dataclass(frozen=True)
class SampleCall:
    """The largest pipeline call the sample file makes."""

    batch: int
    width: int
    height: int
    guidance: bool  # classifier-free guidance (cfg > 1): the UNet sees 2 x batch

    @property
    def key(self) -> tuple:
        return (self.batch, self.width, self.height, self.guidance)


def largest_sample_call(cfg: TrainConfig) -> tuple[SampleCall | None, list[str]]:
    """The pipeline call with the most pixels x UNet batch, or None when sampling is off."""
    if not cfg.sample_prompts:
        return None, []
    from trainer.eval.sampling import SampleFile, _batches, load_sample_jobs

    notes = []
    try:
        jobs, spec = load_sample_jobs(
            cfg.sample_prompts, resolution=cfg.resolution, default_seed=cfg.seed, fallback_captions=[]
        )
    except (TrainerError, OSError) as exc:
        spec = SampleFile()
        jobs, _ = [], None
        notes.append(f"sampling planned with the sample file's defaults ({str(exc).splitlines()[0]})")
        res = cfg.resolution
        calls = [SampleCall(min(4, spec.batch_size), res, res, spec.cfgs[0] > 1)]
    else:
        calls = []
        for batch in _batches(list(enumerate(jobs)), spec.batch_size):
            first = batch[0][1]
            calls.append(SampleCall(len(batch), first.width, first.height, first.cfg > 1))
    if not calls:
        return None, notes
    return max(calls, key=lambda c: (c.batch * (1 + c.guidance) * c.width * c.height, c.key)), notes


def sampling_working_bytes(
    run: FakeRun, call: SampleCall, *, device: str, autocast_dtype: torch.dtype | None
) -> int:
    """Peak live bytes of one pipeline call on `run`'s shadow modules (module docstring)."""
    live = ShadowLiveBytes(granularity=CUDA_ALLOCATION_GRANULARITY if device == "cuda" else 1)
    unet_batch = call.batch * (2 if call.guidance else 1)
    factor = 2 ** (len(run.vae.config["block_out_channels"]) - 1)
    channels = run.unet.config["in_channels"]
    h, w = call.height // factor, call.width // factor
    was = {m: m.training for m in (run.unet, run.text_encoder)}
    run.unet.eval()
    run.text_encoder.eval()
    amp = torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None)
    try:
        with torch.no_grad(), live, amp:
            ids = shadow_zeros(unet_batch, TEXT_TOKENS, dtype=torch.long)
            embeddings = run.text_encoder(ids)[0]
            del ids
            latents = shadow_zeros(call.batch, channels, h, w, dtype=torch.float32)
            model_input = torch.cat([latents] * 2) if call.guidance else latents
            t = shadow_zeros(1, dtype=torch.long)
            out = run.unet(model_input.to(run.dtypes["unet"]), t, encoder_hidden_states=embeddings).sample
            if call.guidance:
                uncond, text = out.chunk(2)
                guided = uncond + 7.0 * (text - uncond)
                del uncond, text
            else:
                guided = out
            steps = [guided.float() for _ in range(SCHEDULER_LATENT_COPIES - 1)]
            del out, model_input, guided, steps, embeddings
            image = run.vae.decode(latents.to(run.dtypes["vae"]) / 0.18215).sample
            image = (image / 2 + 0.5).clamp(0, 1).float()
            del image, latents
    finally:
        for module, mode in was.items():
            module.train(mode)
    return live.peak.total


def ema_swap_bytes(run: FakeRun, cfg: TrainConfig) -> int:
    """`EMA.swapped_in`'s backup of the live trained weights, when it is made on the device."""
    from trainer.eval.sampling import sample_variants

    if not cfg.ema_enabled or cfg.ema_device == "cpu":
        return 0
    variants = sample_variants(
        ema_enabled=True, sample_ema=cfg.ema_sample_ema_model, sample_live=cfg.ema_sample_nonema_model
    )
    if "ema" not in variants:
        return 0
    return sum(p.numel() * p.element_size() for name in run.trained for p in getattr(run, name).parameters())
