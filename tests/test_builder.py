"""trainer/parts/builder.py: the components of a run, built without a run folder (issue 16)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from helpers import ROOT, adamw_file, base_args, copy_images

from trainer.config import load_config
from trainer.data.batch import Batch
from trainer.optim import FusedOptimizerSet, OptimizerSet, TrainingOptimizer
from trainer.parts.builder import build_components


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("builder")
    return {"data_root": copy_images(root / "data", 4), "optimizer_config": adamw_file(root)}


def _config(tmp_path, dataset, **overrides):
    values = {**dataset, "resolution": 64, "batch_size": 2, **overrides}
    return load_config(str(ROOT / "train.json"), base_args(tmp_path, **values))


def test_builds_every_part_and_no_run_folder(tmp_path, dataset):
    cfg = _config(tmp_path, dataset, ema_decay_rate=0.99, ema_update_interval=1)
    parts = build_components(cfg, Accelerator(cpu=True))
    assert parts.trained == ("unet", "text_encoder")
    assert set(parts.ema.state_dict()["shadow"]) == {"unet", "text_encoder"}
    assert parts.total_optimizer_steps == parts.data.windows_per_epoch() * cfg.max_epochs == 2
    assert isinstance(parts.optim, OptimizerSet) and isinstance(parts.optim, TrainingOptimizer)
    logdir = tmp_path / "logs"  # at most the data scan's cache: no run folder, checkpoint or log
    assert not logdir.exists() or [p.name for p in logdir.iterdir()] == [".cache"]


def test_the_trained_parts_are_decided_once_by_the_optimizer_build(tmp_path, dataset):
    """A frozen text encoder is not trained, wrapped, averaged or checkpointed: everything reads
    `trained`, decided when the optimizers are built."""
    cfg = _config(
        tmp_path,
        dataset,
        disable_textenc_training=True,
        gradient_checkpointing=True,
        ema_decay_rate=0.99,
        ema_update_interval=1,
    )
    parts = build_components(cfg, Accelerator(cpu=True))
    assert parts.trained == ("unet",) and list(parts.wrapped) == ["unet"]
    assert set(parts.ema.state_dict()["shadow"]) == {"unet"}
    assert not parts.model.text_encoder.is_activation_checkpointing
    assert parts.model.unet.is_gradient_checkpointing
    assert not any(p.requires_grad for p in parts.model.text_encoder.parameters())


def test_synthetic_batches_need_no_dataset(tmp_path, dataset):
    cfg = _config(tmp_path, {**dataset, "data_root": str(tmp_path / "nowhere")}, fused_back_pass=True)
    parts = build_components(cfg, Accelerator(cpu=True), total_optimizer_steps=3)
    assert parts.data is None and parts.total_optimizer_steps == 3
    assert isinstance(parts.optim, FusedOptimizerSet) and isinstance(parts.optim, TrainingOptimizer)
    batch = Batch(["a", "b"], [0, 1], latents=torch.randn(2, 4, 8, 8))
    before = parts.model.unet.conv_in.weight.detach().clone()
    parts.optim.backward(parts.step(batch).loss.mean())
    assert not parts.optim.step().skipped
    assert not torch.equal(before, parts.model.unet.conv_in.weight)  # updated inside backward


def test_the_vae_runs_channels_last_and_hands_the_unet_contiguous_latents(tmp_path, dataset):
    """The VAE's layout is a speed choice (trainer/parts/placement.py); the latents it returns must
    not carry it into the UNet, which keeps its own layout (`channels_last: false` here)."""
    parts = build_components(_config(tmp_path, dataset), Accelerator(cpu=True))
    conv = parts.model.vae.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = parts.step.encode_latents(pixels)
    assert latents.is_contiguous()
    # the same latents as an NCHW VAE gives, to float rounding
    parts.model.vae.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(parts.step.encode_latents(pixels), latents, rtol=1e-4, atol=1e-5)
    assert not parts.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
