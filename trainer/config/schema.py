"""`TrainConfig`: every train.json key with its type, default, range and one line of help.

The fields are the single source of truth: `--help`, docs/CONFIG.md's key table and the
command line's type reading are generated from them, and every rule between keys is one of its
validators (checked once, when the config is built). Reading train.json and the command line,
and the error messages, are trainer/config/loading.py's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

# EveryDream2 keys accepted with no effect: re-exported here (loading.py reads them from this module)
from trainer.config.ed2_keys import IGNORED_KEY_TYPE as IGNORED_KEY_TYPE
from trainer.config.ed2_keys import IGNORED_KEYS as IGNORED_KEYS

KOHYA_MULTIRES_DISCOUNT = 0.3  # sd-scripts' default --multires_noise_discount

# The LR schedule names, for train.json and optimizer.json alike (trainer/optim/schedules.py reads
# them from here as SCHEDULER_NAMES). Here because this module loads before torch (the command
# line's thread settings must be made first), and trainer.optim imports torch.
LrSchedulerName = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "adafactor"
]


class TrainConfig(BaseModel):
    """Every key of train.json. Field descriptions are the user documentation (docs/CONFIG.md)."""

    # strict: JSON values are taken only as the type they are; allow_inf_nan: Infinity / NaN
    # (which Python's JSON reader accepts) are refused for every float key.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False
    )

    # --- model and data -------------------------------------------------------------------
    resume_ckpt: str = Field(
        "builtin:tiny-sd1",
        description="Model to start from: builtin:NAME, a diffusers folder, a .safetensors/.ckpt "
        "single file, a checkpoint directory of this trainer, or 'findlast'.",
    )
    vae: str | None = Field(None, description="Optional VAE file/folder overriding the model's VAE.")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Override the model scheduler's prediction type."
    )
    data_root: str | list[str] = Field("input", description="Image folder, JSON manifest, or a list of them.")
    resolution: int = Field(
        512, ge=64, le=2048, multiple_of=64, description="Training resolution (bucket area)."
    )
    validation_config: str | None = Field(None, description="EveryDream2 validation JSON.")
    flip_p: float = Field(0.0, ge=0.0, le=1.0, description="Horizontal flip probability.")
    cond_dropout: float = Field(0.04, ge=0.0, le=1.0, description="Probability of an empty caption.")
    shuffle_tags: bool = Field(False, description="Shuffle caption tags each epoch.")
    keep_tags: int = Field(0, ge=0, description="Number of leading tags kept in place when shuffling.")
    cache_latents: bool = Field(
        False,
        description="Encode each image with the VAE once and reuse the latents (disables crop jitter); "
        "the VAE then waits on the host between samples.",
    )
    num_workers: int | None = Field(None, ge=0, description="DataLoader workers (null = automatic).")
    keep_tokens_separator: str = Field(
        "",
        description="kohya: with shuffle_tags, caption text before this separator stays in place, and text "
        "after a second one is a fixed suffix; '' = off (keep_tags counts instead).",
    )
    caption_dropout_every_n_epochs: int = Field(
        0, ge=0, description="kohya: train every N-th epoch (N, 2N, ...) with all captions empty; 0 = off."
    )
    masked_loss: bool = Field(
        False,
        description="Weight the loss per pixel by a mask: <image stem>-masklabel.png beside the image "
        "(white = train), or the alpha channel with mask_from_alpha. No mask = full weight.",
    )
    mask_from_alpha: bool = Field(
        False, description="masked_loss: take each image's mask from its alpha channel (kohya's alpha_mask)."
    )
    unmasked_weight: float = Field(
        0.1, ge=0.0, le=1.0, description="masked_loss: loss weight where the mask is black (OneTrainer's)."
    )
    normalize_masked_area_loss: bool = Field(
        False, description="masked_loss: divide each sample's loss by its mean weight (OneTrainer's)."
    )

    # --- optimisation ---------------------------------------------------------------------
    optimizer_config: str | None = Field(
        "optimizer.json", description="Path to optimizer.json (null = defaults)."
    )
    lr: float | None = Field(
        None, ge=0.0, description="UNet LR; overrides optimizer.json base.lr (0 is a value)."
    )
    lr_scheduler: LrSchedulerName | None = Field(
        None, description="Scheduler used when optimizer.json sets none."
    )
    lr_warmup_steps: int | None = Field(None, ge=0, description="Warmup in optimizer steps.")
    lr_decay_steps: int | None = Field(None, ge=0, description="Decay length in optimizer steps.")
    batch_size: int = Field(2, ge=1, description="Images per micro-batch (one aspect bucket per batch).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_epochs: int = Field(300, ge=1, description="Number of epochs.")
    clip_grad_norm: float | None = Field(None, gt=0.0, description="Clip each component's gradient norm.")
    disable_textenc_training: bool = Field(
        False, description="Freeze the whole text encoder (no optimizer, no gradients)."
    )
    disable_unet_training: bool = Field(
        False, description="Freeze the whole UNet (text-encoder-only training)."
    )
    stop_text_encoder_training: StrictInt | StrictFloat | None = Field(
        None,
        description="Stop training the text encoder after this many optimizer steps (an integer >= 1) or "
        "this fraction of the run (0 < x < 1); its optimizer state is freed then (kohya's key).",
    )
    clip_skip: int = Field(0, ge=0, le=4, description="Use the k-th last text-encoder layer (0/1 = last).")
    max_token_length: Literal[75, 150, 225] = Field(
        75, description="Caption tokens, encoded in 75-token chunks."
    )
    embedding_perturbation: float = Field(0.0, ge=0.0, description="Std factor of noise on TE output.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: much less memory, ~20-30% slower."
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto = bf16 on GPUs that support it else fp16; fp32 on CPU."
    )
    disable_amp: bool = Field(False, description="EveryDream2 spelling of mixed_precision=no.")
    attn_type: Literal["sdp", "xformers", "slice"] = Field(
        "sdp", description="Attention kernel: sdp (PyTorch SDPA), xformers (must be installed), slice."
    )
    seed: int = Field(555, ge=-1, description="-1 picks a random seed (recorded in the run folder).")
    deterministic: bool = Field(
        False,
        description="Deterministic GPU kernels (torch deterministic algorithms, cuDNN deterministic without "
        "benchmark, CUBLAS_WORKSPACE_CONFIG) so a GPU run and its resume are bitwise equal; costs speed "
        "(no cuDNN autotuning, slower backward kernels). CPU runs are reproducible without it.",
    )

    # --- speed and memory (docs/PERFORMANCE.md) ---------------------------------------------
    cache_text_encoder_outputs: bool = Field(
        False,
        description="Encode each distinct caption once and reuse the output; needs a frozen text "
        "encoder (disable_textenc_training). Without shuffle_tags every caption is encoded at "
        "start-up and the encoder waits on the host between samples.",
    )
    compile: bool = Field(False, description="torch.compile the UNet (works with gradient_checkpointing).")
    compile_backend: Literal["inductor", "cudagraphs", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend when compile is true."
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode when compile is true."
    )
    channels_last: bool = Field(False, description="UNet weights and inputs in channels_last memory format.")
    fused_back_pass: bool = Field(
        False,
        description="Step the optimizer per parameter inside backward so all gradients never coexist "
        "(needs grad_accum 1, no clip_grad_norm, no fp16, one process).",
    )
    allow_tf32: bool = Field(
        True,
        description="CUDA: fp32 matmuls/convolutions on TF32 tensor cores (Ampere+); false = full fp32.",
    )
    weight_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Storage of trained weights; bf16 updates them with stochastic rounding."
    )
    vram: float | None = Field(
        None,
        gt=0,
        description="GPU memory budget in GiB for the start-up memory plan (null: the CUDA device's free "
        "memory; on CPU no check unless set). A recipe whose planned peak exceeds it stops before the model "
        "loads, with the plan and the changes that make it fit (sdtrainer plan shows the same).",
    )
    auto_fit: bool = Field(
        False,
        description="When the memory plan does not fit the budget, apply its advice (8-bit states, gradient "
        "checkpointing, fused back pass, bf16 weights, a smaller micro-batch) instead of stopping; each "
        "change is logged.",
    )

    # --- diffusion maths ------------------------------------------------------------------
    loss_type: Literal["mse", "huber", "smooth_l1", "mse_huber", "huber_mse"] = Field(
        "mse", description="Loss: mse, huber, smooth_l1, or a timestep blend (docs/TRAINING_STEP.md)."
    )
    min_snr_gamma: float | None = Field(
        None, gt=0.0, description="Min-SNR loss weighting gamma (e.g. 5); formula per prediction type."
    )
    zero_frequency_noise_ratio: float = Field(0.02, ge=0.0, le=1.0, description="Offset noise strength.")
    pyramid_noise_discount: float | None = Field(
        None, ge=0.0, le=1.0, description="Pyramid (multi-resolution) noise discount; null/0 = off."
    )
    multires_noise_iterations: int | None = Field(
        None,
        ge=1,
        le=32,
        description="Pyramid noise levels (kohya); null = EveryDream2's 10. Alone it turns pyramid noise on "
        "with kohya's discount 0.3.",
    )
    multires_noise_discount: float | None = Field(
        None, ge=0.0, le=1.0, description="kohya's name for pyramid_noise_discount (set one of them)."
    )
    noise_offset_random_strength: bool = Field(
        False, description="Offset noise strength ~ U(0, zero_frequency_noise_ratio) per sample (kohya)."
    )
    ip_noise_gamma: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Input perturbation noise strength (arXiv 2301.11706, ~0.1); null/0 = off.",
    )
    ip_noise_gamma_random_strength: bool = Field(
        False, description="Input perturbation strength ~ U(0, ip_noise_gamma) per sample (kohya)."
    )
    debiased_estimation_loss: bool = Field(
        False,
        description="Weight the loss by 1/sqrt(SNR) (v: 1/(SNR+1)), SNR capped at 1000 (arXiv 2310.08442).",
    )
    enable_zero_terminal_snr: bool = Field(
        False, description="Rescale betas to zero terminal SNR before anything is derived from them."
    )
    timestep_start: int = Field(0, ge=0, le=999, description="Lowest training timestep (inclusive).")
    timestep_end: int = Field(1000, ge=1, le=1000, description="Highest training timestep (exclusive).")

    # --- EMA ------------------------------------------------------------------------------
    ema_decay_rate: float | None = Field(
        None, gt=0.0, lt=1.0, description="Enable EMA with this decay per update."
    )
    ema_strength_target: float | None = Field(
        None, gt=0.0, lt=1.0, description="Enable EMA with the decay derived so that target = decay^updates."
    )
    ema_update_interval: int = Field(500, ge=1, description="Optimizer steps between EMA updates.")
    ema_device: Literal["cpu", "cuda", "device"] = Field(
        "cpu", description="Where EMA weights live: cpu, or the training device ('cuda'/'device')."
    )
    ema_sample_nonema_model: bool = Field(False, description="Generate samples from the live weights.")
    ema_sample_ema_model: bool = Field(False, description="Generate samples from the EMA weights.")

    # --- checkpoints ----------------------------------------------------------------------
    save_every_n_epochs: int | None = Field(
        None, ge=0, description="Save a checkpoint every N epochs; 0 = off."
    )
    ckpt_every_n_minutes: float | None = Field(
        None,
        ge=0.0,
        description="Save a checkpoint every N minutes; 0 = off. With neither this nor "
        "save_every_n_epochs set: every 20 minutes (EveryDream2's default).",
    )
    save_ckpts_from_n_epochs: int = Field(0, ge=0, description="Epoch-based saves start at this epoch.")
    save_full_precision: bool = Field(
        False, description="Write the single-file export in fp32 instead of fp16."
    )
    save_precision: Literal["fp16", "bf16", "fp32"] | None = Field(
        None,
        description="dtype of the single-file exports (kohya's key; 'float' imports as fp32); null = fp16, "
        "or fp32 with save_full_precision.",
    )
    save_every_n_steps: int | None = Field(
        None, ge=0, description="Save a checkpoint every N optimizer steps; 0/null = off (kohya's key)."
    )
    save_optimizer: bool = Field(
        True, description="Make checkpoints resumable (optimizer, RNG, data position)."
    )
    no_save_ckpt: bool = Field(False, description="Skip the single-file .safetensors export.")
    keep_last_checkpoints: int | None = Field(None, ge=1, description="Retention: keep the newest N.")
    extract_lora_rank: int | None = Field(
        None,
        ge=1,
        description="Write a LoRA of this rank (kohya layout, fidelity report beside it) into every checkpoint "
        "folder: the change from the run's base model (recorded in the manifest, kept through resume and "
        "chaining) to the checkpoint's weights; null = off. Each save loads the base to the CPU on rank 0 "
        "(host RAM: one more fp32 model, about 4.3 GB for SD1.5) and frees it after. A failure is logged; "
        "the checkpoint is kept.",
    )
    extract_lora_conv_rank: int = Field(
        0,
        ge=0,
        description="With extract_lora_rank: rank of the ResNet 3x3 convolutions (LoCon), which hold most "
        "of a fine-tune's change; 0 = left out (docs/LORA.md).",
    )
    stop_at_step: int | None = Field(
        None,
        ge=1,
        description="Stop with a resumable checkpoint after this optimizer step (schedule unchanged).",
    )
    max_nonfinite_steps: int = Field(10, ge=1, description="Stop after this many non-finite steps in a row.")

    # --- logging and samples --------------------------------------------------------------
    logdir: str = Field("logs", description="Root folder for run folders.")
    project_name: str = Field(
        "myproj",
        min_length=1,
        pattern=r"^[^/\\]+$",
        description="Name used for run folders, checkpoints and findlast.",
    )
    run_name: str | None = Field(None, description="wandb run name.")
    log_step: int = Field(25, ge=1, description="Log scalars every N optimizer steps.")
    sample_prompts: str | None = Field(
        "sample_prompts.txt", description="sample_prompts.txt (one per line) or sample_prompts.json."
    )
    sample_at_start: bool | None = Field(
        None,
        description="Baseline samples before the first step; null = EveryDream2's rule (the sample "
        "JSON's generate_pretrain_samples, default false; never with a .txt).",
    )
    sample_steps: int = Field(250, ge=1, description="Generate samples every N optimizer steps.")
    wandb: bool = Field(False, description="Mirror metrics to wandb (package must be installed).")

    # --- rules between keys: every one here, checked once (ValueError: pydantic reports it with the source) ---

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        """Combinations of keys that would do nothing or contradict each other."""
        if self.timestep_start >= self.timestep_end:
            raise ValueError(
                f"timestep_start ({self.timestep_start}) must be below timestep_end ({self.timestep_end})"
            )
        if self.disable_unet_training and self.disable_textenc_training:
            raise ValueError(
                "disable_unet_training and disable_textenc_training are both true: nothing would train"
            )
        if self.ema_decay_rate is not None and self.ema_strength_target is not None:
            raise ValueError("set ema_decay_rate or ema_strength_target, not both")
        if self.fused_back_pass and self.grad_accum != 1:
            raise ValueError(
                f"fused_back_pass needs grad_accum 1 (got {self.grad_accum}): each backward updates the "
                "weights, so gradients cannot accumulate. Set grad_accum to 1 or fused_back_pass to false"
            )
        if self.fused_back_pass and self.clip_grad_norm is not None:
            raise ValueError(
                f"fused_back_pass cannot clip gradients (clip_grad_norm={self.clip_grad_norm}): clipping "
                "needs every gradient before the first update. Set clip_grad_norm to null or fused_back_pass "
                "to false"
            )
        if self.cache_text_encoder_outputs and not self.disable_textenc_training:
            raise ValueError(
                "cache_text_encoder_outputs needs disable_textenc_training: true (a text encoder that "
                "trains gives new outputs every step, so they cannot be cached)"
            )
        if self.compile and self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ValueError(
                f"compile_mode {self.compile_mode!r} only applies to compile_backend 'inductor' "
                f"(got {self.compile_backend!r}); set compile_mode to 'default' or the backend to 'inductor'"
            )
        if self.weight_dtype == "bf16" and self.mixed_precision == "fp16" and not self.disable_amp:
            raise ValueError(
                "weight_dtype bf16 with mixed_precision fp16 would compute in fp16 on bf16 weights; "
                "use mixed_precision bf16 (or no)"
            )
        if self.extract_lora_conv_rank > 0 and self.extract_lora_rank is None:
            raise ValueError(
                f"extract_lora_conv_rank {self.extract_lora_conv_rank} does nothing without extract_lora_rank "
                "(null: no LoRA is written); set extract_lora_rank too, or drop extract_lora_conv_rank"
            )
        return self

    @model_validator(mode="after")
    def _kohya_option_checks(self) -> TrainConfig:
        """The same for the kohya/OneTrainer keys (docs/CONFIG.md says where each rule comes from)."""
        stop = self.stop_text_encoder_training
        if stop is not None:
            if isinstance(stop, int) and stop < 1:  # true/false never gets here: the field is strict
                raise ValueError(
                    f"stop_text_encoder_training={stop!r}: give optimizer steps (an integer >= 1) or a fraction "
                    "of the run (0 < x < 1); null = never stop"
                )
            if isinstance(stop, float) and not 0.0 < stop < 1.0:
                raise ValueError(
                    f"stop_text_encoder_training={stop!r}: a fraction must be between 0 and 1 (exclusive); "
                    "write a step count as an integer (e.g. 100, not 100.0)"
                )
            if self.disable_textenc_training:
                raise ValueError(
                    "stop_text_encoder_training has nothing to stop: disable_textenc_training is true"
                )
            if self.fused_back_pass:
                raise ValueError(
                    "stop_text_encoder_training cannot be combined with fused_back_pass (its per-parameter "
                    "optimizers live inside backward); set one of them off"
                )
        needs = {
            "mask_from_alpha": ("masked_loss", self.mask_from_alpha, self.masked_loss),
            "normalize_masked_area_loss": ("masked_loss", self.normalize_masked_area_loss, self.masked_loss),
            "ip_noise_gamma_random_strength": (
                "ip_noise_gamma",
                self.ip_noise_gamma_random_strength,
                self.ip_noise_gamma,
            ),
            "noise_offset_random_strength": (
                "zero_frequency_noise_ratio",
                self.noise_offset_random_strength,
                self.zero_frequency_noise_ratio,
            ),
        }
        for key, (needed, on, base) in needs.items():
            if on and not base:
                raise ValueError(
                    f"{key} is true but does nothing without {needed} (set {needed}, or {key} false)"
                )
        default_weight = type(self).model_fields["unmasked_weight"].default
        if (
            self.unmasked_weight != default_weight and not self.masked_loss
        ):  # the default: train_effective.json
            raise ValueError(
                f"unmasked_weight {self.unmasked_weight} does nothing without masked_loss: set masked_loss true "
                "or drop the key"
            )
        if (
            self.multires_noise_discount is not None
            and self.pyramid_noise_discount is not None
            and self.multires_noise_discount != self.pyramid_noise_discount
        ):
            raise ValueError(
                f"multires_noise_discount ({self.multires_noise_discount}) and pyramid_noise_discount "
                f"({self.pyramid_noise_discount}) are two names of one setting; set only one"
            )
        if self.multires_noise_iterations is not None and self.pyramid_discount == 0.0:
            raise ValueError(
                "multires_noise_iterations is set but the pyramid noise discount is 0 (off); "
                "set pyramid_noise_discount above 0 or drop multires_noise_iterations"
            )
        if self.save_precision not in (None, "fp32") and self.save_full_precision:
            raise ValueError(
                f"save_precision {self.save_precision!r} contradicts save_full_precision true (fp32); set one of them"
            )
        return self

    @property
    def pyramid_discount(self) -> float:
        """The effective pyramid noise discount: either key, or kohya's 0.3 when only
        multires_noise_iterations turns it on; 0 = off."""
        if self.multires_noise_discount is not None:
            return self.multires_noise_discount
        if self.pyramid_noise_discount is not None:
            return self.pyramid_noise_discount
        return KOHYA_MULTIRES_DISCOUNT if self.multires_noise_iterations is not None else 0.0

    def text_encoder_stop_step(self, total_optimizer_steps: int) -> int | None:
        """The optimizer step after which the text encoder stops training (None = never)."""
        value = self.stop_text_encoder_training
        if value is None:
            return None
        if isinstance(value, float):
            return max(1, round(value * total_optimizer_steps))
        return value

    @property
    def ema_enabled(self) -> bool:
        return self.ema_decay_rate is not None or self.ema_strength_target is not None


FIELDS = TrainConfig.model_fields
