"""The memory plan's host table (issue 31): the model load of a single file (its tensors plus
the fp32 components built from them) and the copies a checkpoint save makes, equal to the
tensors the trainer's own loader and exporter make; `--json` carries it as `host`."""

from __future__ import annotations

import json

import torch

from trainer.config import load_config
from trainer.models import load_model, save_single_file
from trainer.models.checkpoint_io import read_checkpoint
from trainer.optim import load_optimizer_file
from trainer.plan import plan_json, plan_memory
from trainer.plan.host import LIBRARY_BYTES


def _recipe(tmp_path, model: str, *extra: str):
    opt = tmp_path / "optimizer.json"
    opt.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-4}}))
    args = ["--resume_ckpt", model, "--resolution", "64", "--batch_size", "1", "--cache_latents", "true"]
    args += ["--optimizer_config", str(opt), "--logdir", str(tmp_path / "logs"), "--mixed_precision", "no"]
    args += ["--sample_prompts", "null", *extra]
    return load_config(None, args)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def test_single_file_load_and_save_copies_equal_the_real_tensors(tmp_path):
    single = tmp_path / "tiny.safetensors"
    save_single_file(load_model("builtin:tiny-sd1"), single)  # fp16, as checkpoints export
    cfg = _recipe(tmp_path, str(single), "--ema_decay_rate", "0.99", "--ema_device", "cpu")
    plan = plan_memory(cfg, load_optimizer_file(cfg.optimizer_config), device="cpu", with_advice=False)
    host = plan.host
    file_tensors = read_checkpoint(single).tensors
    assert host.categories["model_file"] == _bytes(file_tensors.values())
    loaded = load_model(str(single))
    modules = (loaded.unet, loaded.vae, loaded.text_encoder)
    assert all(p.dtype == torch.float32 for m in modules for p in m.parameters())
    assert host.categories["model_components"] == sum(
        _bytes([*m.parameters(), *m.buffers()]) for m in modules
    )
    # a CPU run of fp32 weights: the fp16 single-file export copies every floating tensor, and
    # the EMA save backs the trained weights up on the host (ema_device cpu)
    tensors = [t for m in modules for t in m.state_dict().values()]
    export = sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors)
    trained = sum(_bytes(m.parameters()) for m in (loaded.unet, loaded.text_encoder))
    assert host.categories["checkpoint_save"] == export + trained
    assert trained <= host.categories["ema"] < trained + 4096  # fp32 shadows (+ the small buffers)
    assert host.categories["training_tensors"] == plan.total_bytes  # the device is the host
    assert (
        host.phases["load"]
        == LIBRARY_BYTES + host.categories["model_file"] + host.categories["model_components"]
    )
    assert host.total_bytes == max(host.phases.values())
    out = plan_json(plan)["host"]
    assert out["total_bytes"] == host.total_bytes and out["categories"] == host.categories


def test_on_cuda_the_host_holds_no_training_tensors_and_a_folder_no_file(tmp_path):
    cfg = _recipe(tmp_path, "builtin:tiny-sd1", "--no_save_ckpt", "true")
    plan = plan_memory(cfg, load_optimizer_file(cfg.optimizer_config), device="cuda", with_advice=False)
    c = plan.host.categories
    assert c["training_tensors"] == 0 and c["model_file"] == 0 and c["ema"] == 0
    # no single file: the save's host copies are the largest component, moved to the host to be written
    assert 0 < c["checkpoint_save"] < plan.sizes.weights + plan.sizes.frozen_weights
