"""Shared helpers for the end-to-end tests: run the trainer and read what it wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "shapes"


def copy_images(dest: Path, count: int) -> str:
    """The first `count` bundled images with their captions, in `dest` (a small dataset)."""
    dest.mkdir(parents=True, exist_ok=True)
    for image in sorted(DATA.glob("*.png"))[:count]:
        shutil.copy(image, dest / image.name)
        shutil.copy(image.with_suffix(".txt"), dest / image.with_suffix(".txt").name)
    return str(dest)


def adamw_file(folder: Path, lr: float = 3e-4) -> str:
    """An optimizer.json with plain AdamW for both components: for runs whose subject is not the
    optimizer (the shipped optimizer.json's 8-bit AdamW is slow on CPU)."""
    path = Path(folder) / "optimizer_adamw.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": lr}, "text_encoder_overrides": None}))
    return str(path)


def small_run(folder: Path, **extra) -> dict:
    """Overrides for a short run whose subject is not the model: plain AdamW, 64 px, batch 4, one
    epoch, no checkpoint saves, no latent cache (no VAE pass over the data per test)."""
    return {
        "optimizer_config": adamw_file(folder, lr=1e-4),
        "resolution": 64,
        "batch_size": 4,
        "max_epochs": 1,
        "no_save_ckpt": True,
        "cache_latents": False,
        **extra,
    }


def pinned_optimizer_file(folder: Path) -> str:
    """The root optimizer.json as the tests were written against: its text encoder at the
    train lr (the quick start now scales it by `text_encoder_lr_scale`)."""
    config = json.loads((ROOT / "optimizer.json").read_text())
    config["text_encoder_lr_scale"] = None
    path = Path(folder) / "optimizer_pinned.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return str(path)


def base_args(tmp_path: Path, **overrides) -> list[str]:
    """CLI overrides for a small, fast run on the bundled data in an isolated logdir. The root
    train.json and optimizer.json are the quick start's recipe (64 px, v-prediction on
    tiny-sd1, lr 1e-3, the text encoder at a tenth of it): tests pin what they were written
    against instead of following it."""
    values = {
        "data_root": str(DATA),
        "resolution": 128,
        "lr": 3e-4,
        "min_snr_gamma": None,
        "prediction_type": None,
        "logdir": str(tmp_path / "logs"),
        "optimizer_config": pinned_optimizer_file(tmp_path),
        "sample_prompts": None,
        "validation_config": None,
        "max_epochs": 1,
        "batch_size": 4,
        "log_step": 1,
        "num_workers": 0,
    }
    values.update(overrides)
    args = []
    for key, value in values.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return args


def run_train(args: list[str], *, timeout: int = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run train.py in a subprocess with the default train.json plus `args`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "train.json"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def start_train(args: list[str], log_path: Path) -> subprocess.Popen:
    """Start train.py (default train.json plus `args`) without waiting; its output goes to
    `log_path` (a full pipe would block the trainer). The process carries `log_path`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "train.json"), *args]
    out = open(log_path, "w")  # noqa: SIM115 - closed by the OS when the child exits
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log_path = Path(log_path)
    return proc


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0, poll: float = 0.002):
    """Poll `predicate` until it returns something truthy (returned); fail when the trainer
    exits first (with its log's tail) or after `timeout` seconds (the trainer is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(
                f"trainer exited early ({proc.returncode}): {proc.log_path.read_text()[-2000:]}"
            )
        time.sleep(poll)
    proc.kill()
    raise AssertionError(
        f"timed out after {timeout}s waiting for {getattr(predicate, '__name__', predicate)}"
    )


def train_in_process(tmp_path: Path, **overrides):
    """Run a whole training in this process; returns (summary, session)."""
    from trainer.config import load_config
    from trainer.run.loop import train
    from trainer.run.session import build_session

    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path, **overrides))
    session = build_session(cfg)
    try:
        return train(session), session
    finally:
        session.close()


def scalars(run_folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard scalar tag in a run folder, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def run_folders(logdir: Path) -> list[Path]:
    return sorted(p for p in Path(logdir).iterdir() if p.is_dir() and not p.name.startswith("."))


def checkpoint_dirs(run_folder: Path) -> list[Path]:
    ckpts = run_folder / "checkpoints"
    return (
        sorted(p for p in ckpts.iterdir() if p.is_dir() and not p.name.startswith("."))
        if ckpts.exists()
        else []
    )


def pipeline_weights(checkpoint: Path, folder: str = "pipeline") -> dict[str, torch.Tensor]:
    """UNet + text-encoder tensors of a checkpoint's diffusers folder (`pipeline`, or
    `pipeline_ema`), keyed by component/name."""
    out = {}
    for comp, fname in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        for key, tensor in load_file(str(checkpoint / folder / comp / fname)).items():
            out[canonical_key(f"{comp}/{key}")] = tensor
    return out


def canonical_key(key: str) -> str:
    """One spelling for text-encoder keys: the files hold `text_model.*` (the published layout),
    while transformers 5 names a freshly built CLIPTextModel's tensors without the prefix."""
    return key.replace("text_encoder/text_model.", "text_encoder/", 1)


def start_weights(name: str = "builtin:tiny-sd1") -> dict[str, torch.Tensor]:
    """UNet + text-encoder tensors (float32) of a model before training, keyed like pipeline_weights."""
    from trainer.models import load_model

    m = load_model(name)
    return {
        f"{comp}/{k}": t.float()
        for comp in ("unet", "text_encoder")
        for k, t in getattr(m, comp).state_dict().items()
    }


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    a = {canonical_key(k): v for k, v in a.items()}
    b = {canonical_key(k): v for k, v in b.items()}
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --- the tiny modules unit tests build (one definition, from the built-in tiny-sd1 configs) ----


def bundled_tokenizer():
    """The bundled offline CLIP tokenizer (trainer/models/tokenizer)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(ROOT / "trainer" / "models" / "tokenizer"), model_max_length=77)


def tiny_text_encoder(num_layers: int = 2, *, seed: int | None = 0, **overrides):
    """A random CLIP text encoder with the built-in tiny-sd1 text encoder's config, shrunk
    (1000 tokens, 37-wide MLP, `num_layers` layers) unless `overrides` say otherwise. `seed`
    None draws from the caller's RNG stream instead of seeding it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.models.components import ComponentConfigs

    config = dict(ComponentConfigs.bundled("tiny-sd1").text_encoder)
    config.pop("architectures", None)
    config.update({"vocab_size": 1000, "intermediate_size": 37, "num_hidden_layers": num_layers, **overrides})
    if seed is not None:
        torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**config))


def tiny_unet(*, seed: int | None = 0, **overrides):
    """A random UNet with the built-in tiny-sd1 UNet's config cut to two levels (16, 32 channels,
    one layer per block, 8x8 latents), cross-attending to `tiny_text_encoder`'s 32-wide states."""
    from diffusers import UNet2DConditionModel

    from trainer.models.components import ComponentConfigs

    config = {k: v for k, v in ComponentConfigs.bundled("tiny-sd1").unet.items() if not k.startswith("_")}
    config.update(
        {
            "sample_size": 8,
            "layers_per_block": 1,
            "block_out_channels": (16, 32),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 8,
            **overrides,
        }
    )
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DConditionModel(**config)
