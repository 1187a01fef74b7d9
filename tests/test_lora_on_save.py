"""train.json's `extract_lora_rank`: a LoRA in every checkpoint folder (issue 33).

Tiny runs on the bundled shapes: every checkpoint gets `<checkpoint>-lora.safetensors` in
kohya's layout, its metadata naming the checkpoint's step; at full rank the base + LoRA is the
checkpoint's UNet in every covered layer; the base is the manifest's (`base_model`), kept
through an exact resume; a base that is gone is an error in the log naming it, and the
checkpoint is saved all the same. The runs go through `build_session` and the loop, as
`python train.py` does: the session makes the writer from the config.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import (
    ROOT,
    adamw_file,
    base_args,
    checkpoint_dirs,
    copy_images,
    pipeline_weights,
    run_folders,
)
from trainer.checkpointing.contents import BASE_MODEL
from trainer.checkpointing.store import open_checkpoint
from trainer.config import load_config
from trainer.export.checkpoint_lora import lora_path
from trainer.export.extract import RankSettings, covered_targets
from trainer.export.lora import weight_delta
from trainer.export.naming import UNET
from trainer.models import load_model, save_pipeline
from trainer.runtime.errors import ConfigError

FULL = 10_000  # more than any tiny layer's rank: every layer at its full rank


def run(tmp_path, **overrides):
    """A whole tiny run in this process with the LoRA writer handed to the session, as the
    command line does; returns the run folder's checkpoints."""
    from trainer.run.loop import train
    from trainer.run.session import build_session

    values = {
        "data_root": copy_images(tmp_path / "data", 4),
        "resolution": 64,
        "batch_size": 2,
        "optimizer_config": adamw_file(tmp_path, lr=1e-3),
        "cache_latents": False,
        "no_save_ckpt": True,
        "extract_lora_rank": FULL,
        "extract_lora_conv_rank": FULL,
        **overrides,
    }
    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path, **values))
    session = build_session(cfg)
    try:
        train(session)
    finally:
        session.close()
    return checkpoint_dirs(run_folders(tmp_path / "logs")[0])


def assert_reproduces_unet(lora_file, checkpoint, base_spec):
    """base + LoRA == the checkpoint's UNet in every covered layer (fp16 factors: to 1%)."""
    base = load_model(base_spec)
    tuned = pipeline_weights(checkpoint)
    stored = load_file(str(lora_file))
    params = dict(base.unet.named_parameters())
    written = 0
    for target in covered_targets(base, RankSettings(1, conv_rank=1)):
        if target.component != UNET:
            continue
        base_w = params[target.weight_key].detach().float()
        want = tuned[f"unet/{target.weight_key}"].float()
        if f"{target.lora_name}.lora_up.weight" not in stored:
            assert torch.equal(base_w, want), f"{target.lora_name} changed but is not in the file"
            continue
        up = stored[f"{target.lora_name}.lora_up.weight"]
        down = stored[f"{target.lora_name}.lora_down.weight"]
        got = base_w + weight_delta(up, down, float(stored[f"{target.lora_name}.alpha"]))
        change = (want - base_w).norm()
        assert (got - want).norm() <= 0.01 * change + 1e-6, target.lora_name
        written += 1
    assert written > 0


def metadata(lora_file) -> dict[str, str]:
    with safe_open(str(lora_file), "pt") as f:
        return f.metadata()


def test_a_lora_goes_into_every_checkpoint_and_is_the_checkpoint_at_full_rank(tmp_path):
    checkpoints = run(tmp_path, save_every_n_steps=1)  # 2 steps: saves at steps 1 and 2
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        assert manifest[BASE_MODEL] == "builtin:tiny-sd1"
        lora = lora_path(checkpoint)
        assert lora.name == f"{checkpoint.name}-lora.safetensors" and lora.is_file()
        assert (checkpoint / f"{checkpoint.name}-lora.fidelity.txt").is_file()
        meta = metadata(lora)
        assert meta["sdtrainer.source_step"] == str(manifest["global_step"])
        assert meta["sdtrainer.tuned"] == checkpoint.name and meta["sdtrainer.base"] == "builtin:tiny-sd1"
        keys = load_file(str(lora)).keys()
        assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys  # conv rank > 0
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
        assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in keys} == {
            "lora_up",
            "lora_down",
            "alpha",
        }
        open_checkpoint(checkpoint)  # written after the manifest: the checkpoint is still valid
    assert_reproduces_unet(lora_path(checkpoints[-1]), checkpoints[-1], "builtin:tiny-sd1")


def test_the_base_survives_an_exact_resume_and_a_missing_base_is_an_error_not_a_lost_checkpoint(
    tmp_path, caplog
):
    base = tmp_path / "base"
    save_pipeline(load_model("builtin:tiny-sd1"), base)  # a diffusers folder that can go away
    first = run(
        tmp_path,
        resume_ckpt=str(base),
        max_epochs=2,
        stop_at_step=1,
        extract_lora_rank=4,
        extract_lora_conv_rank=0,
    )
    assert json.loads((first[0] / "manifest.json").read_text())[BASE_MODEL] == str(base.resolve())
    assert metadata(lora_path(first[0]))["sdtrainer.conv_rank"] == "0"

    # exact resume (settings unchanged, the base recorded in the checkpoint, not the checkpoint itself)
    resumed = run(tmp_path, resume_ckpt=str(first[0]), max_epochs=2, stop_at_step=2)
    assert [c.name for c in resumed] == [first[0].name, resumed[-1].name] and len(resumed) == 2
    manifest = json.loads((resumed[-1] / "manifest.json").read_text())
    assert manifest[BASE_MODEL] == str(base.resolve()) and manifest["global_step"] == 2
    assert metadata(lora_path(resumed[-1]))["sdtrainer.base"] == "base"
    assert_reproduces_unet(lora_path(resumed[-1]), resumed[-1], str(base))

    shutil.rmtree(base)  # the base moved away: the next save still saves, and says why it has no LoRA
    with caplog.at_level(logging.ERROR):
        last = run(tmp_path, resume_ckpt=str(resumed[-1]), max_epochs=2, save_every_n_steps=1)[-1]
    assert last.name != resumed[-1].name
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(last.name in e and str(base.resolve()) in e and "does not exist" in e for e in errors), errors
    info = open_checkpoint(last)
    assert "pipeline/unet/diffusion_pytorch_model.safetensors" in info.manifest["files"]
    assert not lora_path(last).exists() and not list(last.glob("*fidelity*"))
    train_log = (run_folders(tmp_path / "logs")[0] / "train.log").read_text()
    assert f"no LoRA written for checkpoint {last}" in train_log


def test_a_conv_rank_without_a_rank_is_refused_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match="extract_lora_conv_rank 8 does nothing without extract_lora_rank"):
        load_config(str(ROOT / "train.json"), base_args(tmp_path, extract_lora_conv_rank=8))
    with pytest.raises(ConfigError, match="extract_lora_rank"):
        load_config(str(ROOT / "train.json"), base_args(tmp_path, extract_lora_rank=0))
