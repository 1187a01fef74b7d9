"""Frozen weights are exported in the precision they were loaded in (issue 22 item 3), and a
partly frozen text encoder has one dtype (issue 13 item 5; docs/TRAINING_STEP.md §11).

The GPU placement (frozen modules in the autocast dtype) is emulated on CPU by making
`_halves_frozen` answer as it does on CUDA; the rest is the real run and the real save.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.helpers import checkpoint_dirs, copy_images, run_folders, train_in_process
from trainer.models import load_model
from trainer.parts import placement


def test_frozen_weights_are_saved_as_loaded_and_a_partly_frozen_te_is_one_dtype(
    tmp_path, monkeypatch, builtin_cache
):
    monkeypatch.setattr(
        placement, "_halves_frozen", lambda device, autocast_dtype: autocast_dtype is not None
    )
    opt = tmp_path / "opt.json"
    opt.write_text(
        json.dumps(
            {
                "base": {"optimizer": "adamw", "lr": 1e-3},
                "text_encoder_freezing": {"unfreeze_last_n_layers": 1, "freeze_embeddings": True},
            }
        )
    )
    _, session = train_in_process(
        tmp_path,
        data_root=copy_images(tmp_path / "data", 2),
        optimizer_config=str(opt),
        resolution=64,
        batch_size=2,
        mixed_precision="bf16",
        weight_dtype="bf16",
        cache_latents=False,
        no_save_ckpt=True,
    )
    te = session.model.text_encoder
    assert {p.dtype for p in te.parameters()} == {torch.bfloat16}  # one dtype, trained and frozen parts
    assert {p.dtype for p in session.model.vae.parameters()} == {torch.bfloat16}  # frozen: autocast dtype
    trained = {n for n, p in te.named_parameters() if p.requires_grad}
    assert trained and not any("embeddings" in n for n in trained)

    original = load_model("builtin:tiny-sd1")
    pipeline = checkpoint_dirs(run_folders(tmp_path / "logs")[0])[-1] / "pipeline"
    vae = load_file(pipeline / "vae" / "diffusion_pytorch_model.safetensors")
    for name, tensor in original.vae.state_dict().items():
        assert vae[name].dtype == torch.float32 and torch.equal(vae[name], tensor), name
    saved_te = load_file(pipeline / "text_encoder" / "model.safetensors")
    saved_te = {k.removeprefix("text_model."): v for k, v in saved_te.items()}
    for name, tensor in original.text_encoder.named_parameters():
        key = name.removeprefix("text_model.")
        if name not in trained:  # frozen: exactly as loaded, although trained in bf16
            assert saved_te[key].dtype == torch.float32 and torch.equal(saved_te[key], tensor), name
    # After the save the run still holds its bf16 weights (the originals were only shown to the savers).
    assert {p.dtype for p in te.parameters()} == {torch.bfloat16}
