"""Sample images during training, comparable across steps and invisible to the training RNG.

Prompts come from `sample_prompts.txt` (one per line) or `sample_prompts.json` (EveryDream2's
format). Every prompt has a fixed seed, so the same noise is denoised at every sampling point
and only the weights differ. Generation runs inside `determinism.isolated_rng` with its own
generators: the training step draws its noise from per-sample seeds and nothing here moves the
global generators, so turning samples on or off leaves the trained weights bitwise identical.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainer.runtime.determinism import isolated_rng
from trainer.runtime.errors import ConfigError

log = logging.getLogger(__name__)


# EveryDream2's sample scheduler names -> diffusers scheduler class and its settings.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "kdpm2": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False},
    ),
    "dpm++_2m_k": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpm++_2s": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": False}),
    "dpm++_2s_k": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False, "noise_sampler_seed": 0}),
    "dpm++_sde_k": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True, "noise_sampler_seed": 0}),
    "dpm++_2m_sde": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False},
    ),
    "dpm++_2m_sde_k": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
}


class SamplePrompt(BaseModel):
    """One entry of `samples`. `seed` -1 draws a new seed at every sampling point (EveryDream2)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = Field(default=None, ge=-1)
    size: tuple[int, int] | None = None
    aspect_ratio: float | None = Field(default=None, gt=0)
    random_caption: bool = False
    cfgs: list[float] | None = None  # EveryDream2 ignores a per-sample list; here it is used (warning)

    @field_validator("size")
    @classmethod
    def _size_multiple_of_8(cls, size):
        if size is not None and any(v < 8 or v % 8 for v in size):
            raise ValueError(
                f"size {list(size)} must be two multiples of 8 (EveryDream2 uses multiples of 64)"
            )
        return size


class SampleFile(BaseModel):
    """EveryDream2's sample_prompts.json schema (doc/LOGGING.md), with its defaults except `cfgs`."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(default=1, ge=1)
    seed: int = 555
    cfgs: list[float] = Field(default_factory=lambda: [7.0])
    scheduler: str = "ddim"
    num_inference_steps: int = Field(default=30, ge=1)
    show_progress_bars: bool = False
    generate_pretrain_samples: bool = False
    generate_samples_every_n_steps: int | None = Field(default=None, ge=1)
    resolution: int | None = Field(default=None, ge=64)
    samples: list[SamplePrompt] = Field(default_factory=list)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name):
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
        if SCHEDULERS[name][0] == "DPMSolverSDEScheduler":
            from diffusers.utils import is_torchsde_available

            if not is_torchsde_available():
                raise ValueError(f"scheduler '{name}' needs the torchsde package (pip install torchsde)")
        return name


@dataclass(frozen=True)
class SampleJob:
    prompt: str
    negative_prompt: str
    seed: int  # -1: a new seed at every sampling point
    width: int
    height: int
    cfg: float
    steps: int
    random_caption: bool = False
    index: int = 0  # the sample's position in the file (names and tags)


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
        spec = _read_sample_json(path)
    else:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
        spec = SampleFile(seed=default_seed, samples=[SamplePrompt(prompt=ln) for ln in lines if ln])
    res = spec.resolution or resolution
    steps = spec.num_inference_steps
    jobs = []
    for i, item in enumerate(spec.samples or [SamplePrompt(random_caption=True)] * 4):
        random_caption = bool((item.random_caption or not item.prompt) and fallback_captions)
        w, h = item.size or _size_for_aspect(res, item.aspect_ratio)
        seed = item.seed if item.seed is not None else spec.seed + i
        jobs += [
            SampleJob(item.prompt, item.negative_prompt, seed, w, h, cfg, steps, random_caption, i)
            for cfg in (item.cfgs if item.cfgs is not None else spec.cfgs)
        ]
    return jobs, spec


def _read_sample_json(path: Path) -> SampleFile:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object with a 'samples' list")
    for i, item in enumerate(data.get("samples") or []):
        if isinstance(item, dict) and item.get("cfgs") is not None:
            log.warning(
                "%s: samples[%d] has its own cfgs %s; they are used for that sample here (EveryDream2 "
                "ignores a per-sample cfgs and uses the top-level cfgs)",
                path,
                i,
                item["cfgs"],
            )
    try:
        return SampleFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {loc}: {first['msg'].removeprefix('Value error, ')}") from exc


def _size_for_aspect(resolution: int, aspect: float | None) -> tuple[int, int]:
    if not aspect:
        return resolution, resolution
    w = int(round(resolution * aspect**0.5 / 64)) * 64
    h = int(round(resolution / aspect**0.5 / 64)) * 64
    return max(64, w), max(64, h)


def concrete_prompt_and_seed(job: SampleJob, step: int, captions: list[str]) -> tuple[str, int]:
    """The prompt and seed of `job` at sampling point `step`.

    A random caption and a seed of -1 change at every sampling point (EveryDream2: "each time");
    both come from a generator keyed on (step, sample index), not from the training RNG, so a
    resumed run renders the same images as an uninterrupted one.
    """
    rng = random.Random(step * 100_003 + job.index)
    prompt = job.prompt
    if job.random_caption:
        prompt = captions[rng.randrange(len(captions))]
    seed = rng.randrange(2**31) if job.seed == -1 else job.seed
    return prompt, seed


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
        spec: SampleFile | None = None,
        captions: list[str] | None = None,
    ):
        self.jobs = jobs
        self.out_dir = out_dir
        self.variants = variants
        self.zero_terminal_snr = zero_terminal_snr
        self.autocast_dtype = autocast_dtype
        self.spec = spec or SampleFile()
        self.captions = captions or []

    def every_n_steps(self, sample_steps: int) -> int:
        """The sample JSON's generate_samples_every_n_steps overrides train.json's sample_steps."""
        return self.spec.generate_samples_every_n_steps or sample_steps

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
            with swap, amp, isolated_rng():
                written += self._render(components, step, metrics, variant)
        return written

    def _render(self, components, step, metrics, variant) -> list[Path]:
        pipe = _pipeline(components, self.zero_terminal_snr, self.spec.scheduler)
        pipe.set_progress_bar_config(disable=not self.spec.show_progress_bars)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        was_training = {m: m.training for m in (components.unet, components.text_encoder)}
        components.unet.eval()
        components.text_encoder.eval()
        paths = []
        try:
            for batch in _batches(list(enumerate(self.jobs)), self.spec.batch_size):
                concrete = [concrete_prompt_and_seed(job, step, self.captions) for _, job in batch]
                first = batch[0][1]
                images = pipe(
                    [prompt for prompt, _ in concrete],
                    negative_prompt=[job.negative_prompt for _, job in batch],
                    width=first.width,
                    height=first.height,
                    num_inference_steps=first.steps,
                    guidance_scale=first.cfg,
                    guidance_rescale=0.7 if self.zero_terminal_snr else 0.0,
                    generator=[torch.Generator(device="cpu").manual_seed(seed) for _, seed in concrete],
                ).images
                for (i, _job), (prompt, _seed), image in zip(batch, concrete, images, strict=True):
                    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt)[:60].strip("_")
                    path = self.out_dir / f"gs{step:06d}-{variant}-{i:02d}-{slug}.png"
                    image.save(path)
                    metrics.image(sample_tag(variant, i, prompt), image, step)
                    paths.append(path)
        finally:
            for module, mode in was_training.items():
                module.train(mode)
        return paths


def _batches(jobs: list[tuple[int, SampleJob]], batch_size: int) -> list[list[tuple[int, SampleJob]]]:
    """Jobs that can share one pipeline call (same size, cfg and steps), `batch_size` at a time.
    Each image keeps its own generator, so batching changes speed, not the pictures."""
    groups: dict[tuple, list] = {}
    for entry in jobs:
        job = entry[1]
        groups.setdefault((job.width, job.height, job.cfg, job.steps), []).append(entry)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def make_sample_scheduler(scheduler_config: dict, name: str, *, zero_terminal_snr: bool):
    """The diffusers scheduler EveryDream2 means by `name`, configured like the model's.

    Zero terminal SNR needs a scheduler that implements `rescale_betas_zero_snr` (ddim, ddpm,
    euler, euler_a, dpm++/dpm++_2m and their variants); the others are refused rather than
    silently sampling with the original betas.
    """
    import diffusers

    class_name, options = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    cfg = dict(scheduler_config)
    if zero_terminal_snr:
        if not _supports_zero_snr(cls):
            usable = [n for n, (c, _) in SCHEDULERS.items() if _supports_zero_snr(getattr(diffusers, c))]
            raise ConfigError(
                f"sample scheduler '{name}' cannot sample a zero-terminal-SNR model "
                f"(enable_zero_terminal_snr); use one of {', '.join(usable)}"
            )
        cfg.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    cfg.setdefault("steps_offset", 1)
    return cls.from_config(cfg, **options)


def _supports_zero_snr(cls) -> bool:
    return "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters


def _pipeline(components, zero_terminal_snr: bool, scheduler: str = "ddim"):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=make_sample_scheduler(
            components.scheduler_config, scheduler, zero_terminal_snr=zero_terminal_snr
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def sample_variants(*, ema_enabled: bool, sample_ema: bool, sample_live: bool) -> list[str]:
    """Which weights to sample. With EMA on and neither flag set, EMA (EveryDream2 sampled nothing)."""
    if not ema_enabled:
        return ["live"]
    chosen = [v for v, on in (("live", sample_live), ("ema", sample_ema)) if on]
    return chosen or ["ema"]


def pretrain_samples_wanted(sample_at_start: bool | None, prompts_path: str, spec: SampleFile) -> bool:
    """Samples before training: train.json's sample_at_start when set; otherwise EveryDream2's
    rule, opt-in with the JSON's generate_pretrain_samples and never with a .txt file."""
    if sample_at_start is not None:
        return sample_at_start
    return Path(prompts_path).suffix.lower() == ".json" and spec.generate_pretrain_samples


def sample_tag(variant: str, index: int, prompt: str) -> str:
    """`samples_<variant>/<NN>-<prompt>`: the prompt, reduced to letters, digits and `_` (what
    TensorBoard tags and file names take) and cut to 60 characters, so each image in TensorBoard
    says what it was asked to show; NN keeps tags unique and in prompt order."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt)[:60].strip("_")
    return f"samples_{variant}/{index:02d}-{slug}" if slug else f"samples_{variant}/{index:02d}"
