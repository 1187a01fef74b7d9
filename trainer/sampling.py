"""Sample images during training, comparable across steps and invisible to the training RNG.

Prompts come from `sample_prompts.txt` (one per line) or `sample_prompts.json` (EveryDream2's
format). Every prompt has a fixed seed, so the same noise is denoised at every sampling point
and only the weights differ. Generation runs inside `torch.random.fork_rng` with its own
generators and never draws from the training generator, so turning samples on or off leaves
the trained weights bitwise identical.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.errors import ConfigError
from trainer.logging import sample_tag

log = logging.getLogger(__name__)


class SamplePrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = None
    size: tuple[int, int] | None = None
    aspect_ratio: float | None = None
    random_caption: bool = False


class SampleFile(BaseModel):
    """EveryDream2's sample_prompts.json schema (scheduler names other than ddim/dpm++ are refused)."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(1, ge=1)
    seed: int = 555
    cfgs: list[float] = Field(default_factory=lambda: [7.0])
    scheduler: str = "ddim"
    num_inference_steps: int = Field(30, ge=1)
    show_progress_bars: bool = False
    generate_pretrain_samples: bool = True
    generate_samples_every_n_steps: int | None = Field(None, ge=1)
    resolution: int | None = None
    samples: list[SamplePrompt] = Field(default_factory=list)


@dataclass(frozen=True)
class SampleJob:
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    cfg: float
    steps: int


def load_sample_jobs(
    path: str | Path, *, resolution: int, default_seed: int, fallback_captions: list[str]
) -> tuple[list[SampleJob], SampleFile]:
    """Read the prompts file into concrete jobs. Empty prompts take a training caption (ED2 rule)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"sample_prompts: file '{path}' does not exist (set sample_prompts to null to disable)"
        )
    if path.suffix.lower() == ".json":
        try:
            spec = SampleFile.model_validate_json(path.read_text(encoding="utf-8-sig"))
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{path}: {loc}: {first['msg']}") from exc
    else:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
        spec = SampleFile(seed=default_seed, samples=[SamplePrompt(prompt=ln) for ln in lines if ln])
    res = spec.resolution or resolution
    steps = spec.num_inference_steps
    jobs = []
    for i, item in enumerate(spec.samples or [SamplePrompt(random_caption=True)] * 4):
        prompt = item.prompt
        if (item.random_caption or not prompt) and fallback_captions:
            prompt = fallback_captions[(spec.seed + i) % len(fallback_captions)]
        w, h = item.size or _size_for_aspect(res, item.aspect_ratio)
        seed = item.seed if item.seed is not None and item.seed >= 0 else spec.seed + i
        jobs += [SampleJob(prompt, item.negative_prompt, seed, w, h, cfg, steps) for cfg in spec.cfgs]
    return jobs, spec


def _size_for_aspect(resolution: int, aspect: float | None) -> tuple[int, int]:
    if not aspect:
        return resolution, resolution
    w = int(round(resolution * aspect**0.5 / 64)) * 64
    h = int(round(resolution / aspect**0.5 / 64)) * 64
    return max(64, w), max(64, h)


class SampleGenerator:
    """Builds a pipeline around the live modules on demand and renders every job."""

    def __init__(
        self,
        jobs: list[SampleJob],
        out_dir: Path,
        *,
        variants: list[str],
        zero_terminal_snr: bool,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.jobs = jobs
        self.out_dir = out_dir
        self.variants = variants
        self.zero_terminal_snr = zero_terminal_snr
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def generate(self, components, step: int, metrics, ema=None) -> list[Path]:
        written = []
        for variant in self.variants:
            if variant == "ema" and ema is None:
                continue
            modules = {"unet": components.unet, "text_encoder": components.text_encoder}
            swap = ema.swapped_in(modules) if variant == "ema" else contextlib.nullcontext()
            device_type = components.unet.device.type
            amp = torch.autocast(
                device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
            )
            with swap, amp, torch.random.fork_rng(devices=_cuda_devices()):
                written += self._render(components, step, metrics, variant)
        return written

    def _render(self, components, step, metrics, variant) -> list[Path]:
        pipe = _pipeline(components, self.zero_terminal_snr)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        was_training = {m: m.training for m in (components.unet, components.text_encoder)}
        components.unet.eval()
        components.text_encoder.eval()
        paths = []
        try:
            for i, job in enumerate(self.jobs):
                generator = torch.Generator(device="cpu").manual_seed(job.seed)
                image = pipe(
                    job.prompt,
                    negative_prompt=job.negative_prompt or None,
                    width=job.width,
                    height=job.height,
                    num_inference_steps=job.steps,
                    guidance_scale=job.cfg,
                    guidance_rescale=0.7 if self.zero_terminal_snr else 0.0,
                    generator=generator,
                ).images[0]
                slug = re.sub(r"[^A-Za-z0-9]+", "_", job.prompt)[:60].strip("_")
                path = self.out_dir / f"gs{step:06d}-{variant}-{i:02d}-{slug}.png"
                image.save(path)
                metrics.image(sample_tag(variant, i, job.prompt), image, step)
                paths.append(path)
        finally:
            for module, mode in was_training.items():
                module.train(mode)
        return paths


def _pipeline(components, zero_terminal_snr: bool):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched_cfg = dict(components.scheduler_config)
    if zero_terminal_snr:
        sched_cfg.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    sched_cfg.setdefault("steps_offset", 1)
    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=DDIMScheduler.from_config(sched_cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def sample_variants(*, ema_enabled: bool, sample_ema: bool, sample_live: bool) -> list[str]:
    """Which weights to sample. With EMA on and neither flag set, EMA (EveryDream2 sampled nothing)."""
    if not ema_enabled:
        return ["live"]
    chosen = [v for v, on in (("live", sample_live), ("ema", sample_ema)) if on]
    return chosen or ["ema"]
