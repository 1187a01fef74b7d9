"""Built-in models, tokenizer, diffusers-folder loading and saving (trainer.models)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402

from trainer.models import BUILTINS, build_builtin, cache_dir, load_model, save_pipeline  # noqa: E402
from trainer.models import builtin as builtin_mod  # noqa: E402
from trainer.models.components import load_tokenizer  # noqa: E402
from trainer.models.tiny_vae import tiny_vae_config  # noqa: E402
from trainer.runtime.errors import ModelLoadError  # noqa: E402

CROSS = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
CROSS_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3


@pytest.fixture(scope="module")
def tiny_sd1():
    return load_model("builtin:tiny-sd1")


@pytest.fixture(scope="module")
def tiny_sd2():
    return load_model("builtin:tiny-sd2")


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def test_builtin_build_is_deterministic_and_leaves_global_rng_alone():
    rng = torch.get_rng_state()
    a, b = build_builtin("tiny-sd1"), build_builtin("tiny-sd1")
    assert torch.equal(rng, torch.get_rng_state())
    for part in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(a, part), getattr(b, part))
    other = build_builtin("tiny-sd2")  # a different seed gives different weights (the VAE is shared)
    assert not torch.equal(a.unet.conv_in.weight, other.unet.conv_in.weight)


def _assert_sd_unet_topology(unet) -> None:
    assert list(unet.config.down_block_types) == CROSS
    assert list(unet.config.up_block_types) == CROSS_UP
    assert len(unet.config.block_out_channels) == 4
    for i, block in enumerate(unet.down_blocks):
        assert len(block.resnets) == 2
        assert (len(getattr(block, "attentions", [])) == 2) == (i < 3)
        assert (block.downsamplers is not None) == (i < 3)
    for i, block in enumerate(unet.up_blocks):
        assert len(block.resnets) == 3
        assert (len(getattr(block, "attentions", [])) == 3) == (i > 0)
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn2 is not None


def _assert_sd_vae(vae) -> None:
    assert len(vae.config.block_out_channels) == 4 and vae.config.latent_channels == 4
    assert vae.config.scaling_factor == tiny_vae_config()["scaling_factor"]  # the trained tiny VAE's
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)  # 8x downsampling


def test_tiny_sd1_topology(tiny_sd1):
    c = tiny_sd1
    assert c.family == "sd1" and c.prediction_type == "epsilon"
    _assert_sd_unet_topology(c.unet)
    assert c.unet.config.use_linear_projection is False
    assert isinstance(c.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    _assert_sd_vae(c.vae)
    te = c.text_encoder.config
    assert te.hidden_act == "quick_gelu" and te.max_position_embeddings == 77
    assert 4 <= te.num_hidden_layers <= 6 and te.vocab_size == 49408
    assert c.unet.config.cross_attention_dim == te.hidden_size
    assert c.scheduler_config == {
        "_class_name": "DDPMScheduler",
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        # kept from the model's own scheduler config: they decide zero-terminal-SNR sampling
        "rescale_betas_zero_snr": False,
        "timestep_spacing": "leading",
    }


def test_tiny_sd2_topology(tiny_sd2):
    c = tiny_sd2
    assert c.family == "sd2" and c.prediction_type == "v_prediction"
    _assert_sd_unet_topology(c.unet)
    assert c.unet.config.use_linear_projection is True
    assert isinstance(c.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    heads = list(c.unet.config.attention_head_dim)
    assert len(heads) == 4 and heads[0] < heads[1] == heads[3]  # per-level, like [5, 10, 20, 20]
    _assert_sd_vae(c.vae)
    te = c.text_encoder.config
    assert te.hidden_act == "gelu" and te.max_position_embeddings == 77 and te.vocab_size == 49408
    assert c.tokenizer.pad_token == "!"  # SD2's OpenCLIP tokenizer pads with "!" (id 0)
    assert DDIMScheduler.from_config(c.scheduler_config).config.prediction_type == "v_prediction"


def test_tokenizer_matches_clip_ids(tiny_sd1):
    tok = tiny_sd1.tokenizer
    assert tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("Hello, World!").input_ids == [49406, 3306, 267, 1002, 256, 49407]
    padded = tok("a cat", padding="max_length", truncation=True, max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    assert len(tok) == 49408
    sd2 = load_tokenizer({"pad_token": "!"})
    assert sd2("a", padding="max_length", max_length=5).input_ids == [49406, 320, 49407, 0, 0]


def test_cache_is_reused_without_rebuilding(tiny_sd1, monkeypatch):
    folder = cache_dir("tiny-sd1")
    assert (folder / "model_index.json").is_file()
    monkeypatch.setattr(builtin_mod, "build_builtin", lambda name: pytest.fail("rebuilt a cached model"))
    again = load_model("builtin:tiny-sd1")
    _assert_same_weights(again.unet, tiny_sd1.unet)
    assert "cached at" in again.source
    fresh = build_builtin("tiny-sd1")  # the cache holds exactly what the build makes
    for part in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(fresh, part), getattr(again, part))


def test_failed_build_leaves_no_cache_entry(monkeypatch, tmp_path):
    monkeypatch.setenv("SDTRAINER_CACHE", str(tmp_path))

    def broken_save(components, out_dir):
        (Path(out_dir) / "partial").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(builtin_mod, "save_pipeline", broken_save)
    with pytest.raises(OSError, match="disk full"):
        load_model("builtin:tiny-sd1")
    parent = cache_dir("tiny-sd1").parent
    left = [p.name for p in parent.iterdir() if p.suffix != ".lock"]  # the build lock's file may stay
    assert left == []  # neither the final folder nor the temp folder


def test_unknown_builtin_lists_names():
    with pytest.raises(ModelLoadError) as e:
        load_model("builtin:tiny-sd3")
    for name in BUILTINS:
        assert f"builtin:{name}" in str(e.value)


def test_bad_paths_are_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(str(tmp_path))
    weird = tmp_path / "model.txt"
    weird.write_text("hi")
    with pytest.raises(ModelLoadError, match="neither a folder nor a checkpoint"):
        load_model(str(weird))
    with pytest.raises(ModelLoadError, match="prediction_type"):
        load_model("builtin:tiny-sd1", prediction_type="sample")


def test_save_pipeline_loads_offline_and_generates(tiny_sd2, tmp_path):
    out = tmp_path / "pipe"
    save_pipeline(tiny_sd2, out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    tok_cfg = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 77
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.tokenizer.model_max_length == 77
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    # and our loader reads it back to the same weights
    back = load_model(str(out))
    assert back.family == "sd2" and back.prediction_type == "v_prediction"
    _assert_same_weights(back.text_encoder, tiny_sd2.text_encoder)
    _assert_same_weights(back.unet, tiny_sd2.unet)


def test_pipeline_folder_overrides_and_repairs(tiny_sd1, tmp_path, caplog):
    out = tmp_path / "pipe"
    save_pipeline(tiny_sd1, out)
    cfg_path = out / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["model_max_length"]  # as some old exports are
    cfg_path.write_text(json.dumps(cfg))
    c = load_model(str(out), prediction_type="v_prediction")
    assert c.prediction_type == "v_prediction"
    assert c.tokenizer.model_max_length == 77
    assert "model_max_length" in caplog.text
    (out / "model_index.json").unlink()
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        load_model(str(out))


def test_load_in_half_precision():
    c = load_model("builtin:tiny-sd1", dtype=torch.float16)
    assert {p.dtype for p in c.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in c.text_encoder.parameters()} == {torch.float16}


def test_builtin_cli_writes_pipeline(tmp_path):
    out = tmp_path / "cli"
    assert builtin_mod.main(["tiny-sd1", str(out)]) == 0
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()
    assert builtin_mod.main(["tiny-sd1", str(out)]) == 2  # refuses a non-empty folder


@pytest.mark.parametrize("name,config", [("sd15-arch", "sd15"), ("sd21-arch", "sd21")])
def test_full_size_builtins_are_declared_with_published_configs(name, config):
    from trainer.models.components import ComponentConfigs

    assert BUILTINS[name].config == config
    cfg = ComponentConfigs.bundled(config)
    assert cfg.unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert cfg.vae["block_out_channels"] == [128, 256, 512, 512]
    if config == "sd15":
        assert (cfg.unet["cross_attention_dim"], cfg.text_encoder["num_hidden_layers"]) == (768, 12)
        assert cfg.scheduler["prediction_type"] == "epsilon"
    else:
        assert (cfg.unet["cross_attention_dim"], cfg.text_encoder["num_hidden_layers"]) == (1024, 23)
        assert cfg.unet["attention_head_dim"] == [5, 10, 20, 20] and cfg.unet["use_linear_projection"]
        assert cfg.scheduler["prediction_type"] == "v_prediction"
