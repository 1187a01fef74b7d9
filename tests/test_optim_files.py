"""Every shipped optimizer JSON loads, builds on a tiny UNet + CLIP text encoder, and trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_text_encoder, tiny_unet
from torch import nn

from trainer.optim import TrainOptimSettings, build_optimizers, load_optimizer_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    [ROOT / "optimizer.json", ROOT / "optimizerSD21.json", ROOT / "optimizer_dadapt.json"]
    + list((ROOT / "examples" / "optimizers").glob("*.json"))
)


def test_all_expected_files_ship():
    names = {p.name for p in SHIPPED}
    for name in (
        "optimizer.json",
        "optimizerSD21.json",
        "optimizer_dadapt.json",
        "lion.json",
        "lion8bit.json",
        "prodigy.json",
        "adafactor_adaptive.json",
        "adafactor_constant.json",
        "dadapt_lion.json",
    ):
        assert name in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_file_trains_tiny_sd(path):
    unet, te = tiny_unet(), tiny_text_encoder(4)
    opt_set = build_optimizers(
        load_optimizer_file(path),
        TrainOptimSettings(clip_grad_norm=1.0),
        unet=unet,
        text_encoder=te,
        total_optimizer_steps=20,
    )
    assert set(opt_set.components) == {"unet", "text_encoder"}
    before = {name: [p.detach().clone() for p in comp.params] for name, comp in opt_set.components.items()}
    torch.manual_seed(0)
    latents, ids = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2, 8))
    for _ in range(2):
        noise = torch.randn_like(latents)
        hidden = te(ids).last_hidden_state
        pred = unet(latents + noise, torch.tensor([10, 500]), encoder_hidden_states=hidden).sample
        nn.functional.mse_loss(pred, noise).backward()
        result = opt_set.step()
        assert not result.skipped
        assert set(result.grad_norms) == {"unet", "text_encoder"}
    for name, comp in opt_set.components.items():
        moved = any(not torch.equal(p, b) for p, b in zip(comp.params, before[name], strict=True))
        assert moved, f"{path.name}: {name} did not change"
    lrs = opt_set.learning_rates()
    assert all(math.isfinite(lr) and lr > 0 for lr in lrs.values()), lrs  # every example file trains
    assert "unet" in opt_set.summary_table()


def test_sd21_file_freezes_all_but_last_two_layers_and_final_norm():
    te = tiny_text_encoder(4)
    opt_set = build_optimizers(
        load_optimizer_file(ROOT / "optimizerSD21.json"),
        TrainOptimSettings(),
        unet=tiny_unet(),
        text_encoder=te,
        total_optimizer_steps=10,
    )
    trainable = opt_set.components["text_encoder"].param_names
    assert trainable
    for name in trainable:
        name = name.removeprefix("text_model.")
        assert name.startswith(("encoder.layers.2.", "encoder.layers.3.", "final_layer_norm.")), name
    assert any(n.removeprefix("text_model.").startswith("final_layer_norm.") for n in trainable)
    lrs = opt_set.learning_rates()
    assert lrs["text_encoder"] < lrs["unet"]


@pytest.mark.parametrize(
    ("name", "te_lr"),
    # explicit TE lr kept; null: the train lr, times optimizer.json's text_encoder_lr_scale 0.1
    [("optimizerSD21.json", 3e-7), ("optimizer.json", 3e-5)],
)
def test_shipped_file_with_train_lr_keeps_an_explicit_te_lr_and_copies_a_null_one(name, te_lr):
    opt_set = build_optimizers(
        load_optimizer_file(ROOT / name),
        TrainOptimSettings(lr=3e-4),
        unet=tiny_unet(),
        text_encoder=tiny_text_encoder(4),
        total_optimizer_steps=10,
    )
    assert opt_set.components["unet"].resolved.lr == 3e-4
    assert opt_set.components["text_encoder"].resolved.lr == pytest.approx(te_lr, rel=1e-12)
