"""The files other tools read: what they contain, key by key, and what survives a round trip.

Expectations come from the published SD1.5 / SD2.1 files and from the public code of the loaders
that read ours (ComfyUI `comfy/supported_models.py`, `model_detection.py`, `utils.py`; kohya
sd-scripts `library/model_util.py`; diffusers `single_file_utils.py`; transformers 4.x
`CLIPTextModel`). They are written out here as facts (key names, counts, shapes), not run.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import DDIMScheduler  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from trainer.models import load_model, save_pipeline, save_single_file  # noqa: E402
from trainer.models.saving import inference_scheduler  # noqa: E402
from trainer.step.diffusion import NoiseSchedule  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return {name: load_model(f"builtin:{name}") for name in ("tiny-sd1", "tiny-sd2")}


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert not [k for k in sa if not torch.equal(sa[k], sb[k])]


# Per-layer keys of a transformers CLIPTextModel, as the published SD1.5 / SD2.1 folders name them.
CLIP_LAYER_PARTS = [
    f"{module}.{kind}"
    for module in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm1",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
    for kind in ("weight", "bias")
]
CLIP_TOP = [
    "embeddings.token_embedding.weight",
    "embeddings.position_embedding.weight",
    "final_layer_norm.weight",
    "final_layer_norm.bias",
]


def clip_keys(layers: int, prefix: str) -> set[str]:
    """SD1.5: 12 layers, 196 keys; SD2.1's diffusers folder: 23 layers, 372 keys."""
    return {prefix + k for k in CLIP_TOP} | {
        f"{prefix}encoder.layers.{i}.{part}" for i in range(layers) for part in CLIP_LAYER_PARTS
    }


# --- diffusers folder: the text encoder in the layout transformers 4.x reads ----------------------


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_pipeline_text_encoder_is_saved_with_text_model_keys(tiny, name, tmp_path):
    c = tiny[name]
    save_pipeline(c, tmp_path / "pipe")
    folder = tmp_path / "pipe" / "text_encoder"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    saved = load_file(str(folder / "model.safetensors"))
    # transformers 4.x CLIPTextModel holds `text_model.*`; without the prefix it loads nothing.
    assert set(saved) == clip_keys(c.text_encoder.config.num_hidden_layers, "text_model.")
    reloaded, info = CLIPTextModel.from_pretrained(str(folder), output_loading_info=True)  # transformers 5
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _same(reloaded, c.text_encoder)
    save_pipeline(load_model(str(tmp_path / "pipe")), tmp_path / "again")  # stays canonical when re-saved
    assert set(load_file(str(tmp_path / "again" / "text_encoder" / "model.safetensors"))) == set(saved)


# --- zero terminal SNR: kept on load, on export, through a single file ----------------------------


def _ztsnr_folder(tiny, tmp_path):
    """A diffusers folder of a zero-terminal-SNR v-prediction model, as such models are published."""
    save_pipeline(tiny["tiny-sd2"], tmp_path / "ztsnr")
    path = tmp_path / "ztsnr" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    path.write_text(json.dumps(cfg))
    return tmp_path / "ztsnr"


def test_a_zero_snr_base_model_trains_and_exports_with_its_schedule(tiny, tmp_path):
    loaded = load_model(str(_ztsnr_folder(tiny, tmp_path)))
    cfg = loaded.scheduler_config
    assert cfg["rescale_betas_zero_snr"] is True and cfg["timestep_spacing"] == "trailing"
    assert NoiseSchedule.from_scheduler_config(cfg).alphas_cumprod[-1].item() == 0.0
    save_pipeline(loaded, tmp_path / "again")
    again = DDIMScheduler.from_pretrained(str(tmp_path / "again" / "scheduler"))
    assert again.config.rescale_betas_zero_snr and again.config.timestep_spacing == "trailing"
    assert again.alphas_cumprod[-1].item() == 0.0


def test_zero_snr_training_exports_the_schedule_it_trained_with(tmp_path):
    from tests.helpers import ROOT, base_args, checkpoint_dirs
    from trainer.config import load_config
    from trainer.run.loop import train
    from trainer.run.session import build_session

    args = base_args(
        tmp_path,
        resume_ckpt="builtin:tiny-sd2",
        enable_zero_terminal_snr=True,
        resolution=64,
        batch_size=2,
        stop_at_step=1,
        cache_latents=False,
        no_save_ckpt=False,
        save_optimizer=False,
    )
    session = build_session(load_config(str(ROOT / "train.json"), args))
    try:
        train(session)
    finally:
        session.close()
    trained = session.step.schedule
    assert trained.alphas_cumprod[-1].item() == 0.0
    (ckpt,) = checkpoint_dirs(session.run.path)
    sched = DDIMScheduler.from_pretrained(str(ckpt / "pipeline" / "scheduler"))
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.rescale_betas_zero_snr and sched.config.timestep_spacing == "trailing"
    assert sched.alphas_cumprod[-1].item() == 0.0  # a plain schedule has 0.0047 here
    assert torch.allclose(sched.alphas_cumprod, trained.alphas_cumprod, atol=1e-6)
    sched.set_timesteps(10)
    assert sched.timesteps[0].item() == 999  # inference starts where training put pure noise
    (single,) = ckpt.glob("*.safetensors")
    with safe_open(str(single), "pt") as f:
        assert f.metadata()["sdtrainer.zero_terminal_snr"] == "true"
    reloaded = load_model(str(single))
    assert reloaded.scheduler_config["rescale_betas_zero_snr"] is True
    assert reloaded.prediction_type == "v_prediction"


def test_plain_models_keep_a_plain_schedule(tiny, tmp_path):
    c = tiny["tiny-sd1"]
    assert not c.scheduler_config.get("rescale_betas_zero_snr")
    assert inference_scheduler(c).alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=1e-4)
    save_single_file(c, tmp_path / "plain.safetensors", half=False)
    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as f:
        assert "sdtrainer.zero_terminal_snr" not in f.metadata()
    on = load_model("builtin:tiny-sd1", zero_terminal_snr=True)
    assert inference_scheduler(on).alphas_cumprod[-1].item() == 0.0
    assert not c.scheduler_config.get("rescale_betas_zero_snr")  # the shared model is untouched


# --- single files: the published layout, key for key ---------------------------------------------

# sha256 (first 16 hex digits) of the sorted "key shape" lines ("key 320,4,3,3"; "" for a scalar),
# per component, of the published v1-5-pruned-emaonly and v2-1_768-ema-pruned files (non-EMA
# weights; the key lists the A1111 model toolkit extension ships for them), with their counts.
PUBLISHED = {
    "sd15": {
        "model.diffusion_model.": (686, "dc00164c142b2f9c"),
        "first_stage_model.": (248, "8df3ba683aca07c3"),
        "cond_stage_model.transformer.text_model.": (197, "08c482d9412adc11"),
    },
    "sd21": {
        "model.diffusion_model.": (686, "6a0b60b08aea0fc3"),
        "first_stage_model.": (248, "8df3ba683aca07c3"),
        "cond_stage_model.model.": (294, "c0a78633feed9d24"),  # 24 blocks x 12 + 6
    },
}


def _layout_digest(shapes: dict[str, tuple[int, ...]], prefix: str) -> tuple[int, str]:
    import hashlib

    lines = sorted(f"{k} {','.join(map(str, s))}" for k, s in shapes.items() if k.startswith(prefix))
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _full_size_export(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the single file exported from the full-size architecture (no weights made)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from trainer.models.components import ComponentConfigs, SDComponents
    from trainer.models.single_file import ldm_state_dict

    cfg = ComponentConfigs.bundled(name)
    te_config = CLIPTextConfig(**{k: v for k, v in cfg.text_encoder.items() if k != "architectures"})
    with init_empty_weights():
        modules = UNet2DConditionModel.from_config(cfg.unet), AutoencoderKL.from_config(cfg.vae)
        text_encoder = CLIPTextModel(te_config)
    components = SDComponents(*modules, text_encoder, None, cfg.scheduler, cfg.family, name)
    return {k: tuple(v.shape) for k, v in ldm_state_dict(components).items()}


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_single_file_has_the_published_layout(name):
    shapes = _full_size_export(name)
    assert len(shapes) == sum(count for count, _ in PUBLISHED[name].values())  # nothing else either
    for prefix, expected in PUBLISHED[name].items():
        assert _layout_digest(shapes, prefix) == expected, prefix
    if name == "sd21":  # the OpenCLIP parts SD2 does not use, as ComfyUI's CLIP-H expects them
        assert shapes["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
        assert shapes["cond_stage_model.model.text_projection"] == (1024, 1024)
        assert shapes["cond_stage_model.model.logit_scale"] == ()
    else:
        assert shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] == (1, 77)


def _detector_view(shapes: dict[str, tuple[int, ...]]) -> dict:
    """What ComfyUI's model detection reads from a file's keys and shapes to pick a model class."""
    unet = "model.diffusion_model."
    attn = f"{unet}input_blocks.1.1."
    return {
        "unet_prefix": unet if any(k.startswith(unet) for k in shapes) else None,
        "in_channels": shapes[f"{unet}input_blocks.0.0.weight"][1],
        "model_channels": shapes[f"{unet}input_blocks.0.0.weight"][0],
        "out_channels": shapes[f"{unet}out.2.weight"][0],
        "context_dim": shapes[f"{attn}transformer_blocks.0.attn2.to_k.weight"][1],
        "use_linear_in_transformer": len(shapes[f"{attn}proj_in.weight"]) == 2,
        "adm_in_channels": shapes.get(f"{unet}label_emb.0.0.weight"),
        "temporal": any(".time_stack." in k or ".time_mix_blocks." in k for k in shapes),
        "sd2_v_heuristic_key": f"{unet}output_blocks.11.1.transformer_blocks.0.norm1.bias" in shapes,
        "vae_prefix": any(k.startswith("first_stage_model.") for k in shapes),
    }


@pytest.mark.parametrize(
    ("name", "comfy_class"),
    [
        # ComfyUI supported_models.SD15.unet_config / SD20.unet_config
        ("sd15", {"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False}),
        ("sd21", {"context_dim": 1024, "model_channels": 320, "use_linear_in_transformer": True}),
    ],
)
def test_comfyui_detection_picks_the_right_model_class(name, comfy_class):
    view = _detector_view(_full_size_export(name))
    assert {k: view[k] for k in comfy_class} == comfy_class
    assert view["unet_prefix"] == "model.diffusion_model." and view["vae_prefix"]
    assert view["in_channels"] == 4 and view["out_channels"] == 4  # not an inpainting model
    assert view["adm_in_channels"] is None and not view["temporal"]  # not unCLIP / SVD
    assert view["sd2_v_heuristic_key"]  # SD20 guesses v-prediction from this tensor's spread


def _openclip_blocks(sd: dict) -> set[int]:
    prefix = "cond_stage_model.model.transformer.resblocks."
    return {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}


def test_sd2_single_file_has_the_whole_openclip_tower(tiny, tmp_path):
    c = tiny["tiny-sd2"]
    n, width = c.text_encoder.config.num_hidden_layers, c.text_encoder.config.hidden_size
    save_single_file(c, tmp_path / "m.safetensors", half=False)
    sd = load_file(str(tmp_path / "m.safetensors"))
    assert _openclip_blocks(sd) == set(range(n + 1))  # SD2 uses n; the file holds n + 1, as SD2.1's
    assert len([k for k in sd if k.startswith("cond_stage_model.")]) == 12 * (n + 1) + 6
    last, used = "cond_stage_model.model.transformer.resblocks.", f".{n - 1}."
    for key in [k for k in sd if k.startswith(f"{last}{n}.")]:  # made up as kohya does: a copy
        assert torch.equal(sd[key], sd[key.replace(f".{n}.", used, 1)])
    assert torch.equal(sd["cond_stage_model.model.text_projection"], torch.eye(width))
    assert sd["cond_stage_model.model.logit_scale"].shape == ()
    # diffusers splits the fused q/k/v by text_projection's first dimension: it must be the width.
    loaded = load_model(str(tmp_path / "m.safetensors"))
    _same(loaded.text_encoder, c.text_encoder)


def test_sd2_tower_parts_of_the_source_file_are_written_back(tiny, tmp_path):
    c = tiny["tiny-sd2"]
    n, width = c.text_encoder.config.num_hidden_layers, c.text_encoder.config.hidden_size
    save_single_file(c, tmp_path / "m.safetensors", half=False)
    sd = load_file(str(tmp_path / "m.safetensors"))
    g = torch.Generator().manual_seed(0)
    real = {k: torch.randn(v.shape, generator=g) for k, v in sd.items() if f"resblocks.{n}." in k}
    real["cond_stage_model.model.text_projection"] = torch.randn(width, width, generator=g)
    real["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    save_file({**sd, **real}, str(tmp_path / "real.safetensors"))
    loaded = load_model(str(tmp_path / "real.safetensors"))
    _same(loaded.text_encoder, c.text_encoder)  # the extra block never reaches the model ...
    save_single_file(loaded, tmp_path / "out.safetensors", half=False)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert out.keys() == sd.keys()
    assert all(torch.equal(out[k], v) for k, v in real.items())  # ... and comes back unchanged


# --- loading single files: every failure a ModelLoadError naming file, key and shapes -------------


def test_kohya_dummy_text_projection_on_a_smaller_model_loads(tiny, tmp_path, caplog):
    """kohya sd-scripts writes a 1024x1024 text_projection and logit_scale 1 whatever the width."""
    c = tiny["tiny-sd2"]
    save_single_file(c, tmp_path / "m.safetensors", half=False)
    sd = load_file(str(tmp_path / "m.safetensors"))
    sd["cond_stage_model.model.text_projection"] = torch.ones(1024, 1024)
    sd["cond_stage_model.model.logit_scale"] = torch.tensor(1)
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    loaded = load_model(str(tmp_path / "kohya.safetensors"))
    _same(loaded.text_encoder, c.text_encoder)
    assert "text_projection has shape [1024, 1024]" in caplog.text
    save_single_file(loaded, tmp_path / "out.safetensors", half=False)
    out = load_file(str(tmp_path / "out.safetensors"))
    width = c.text_encoder.config.hidden_size
    assert out["cond_stage_model.model.text_projection"].shape == (width, width)
    assert out["cond_stage_model.model.logit_scale"].dtype == torch.float32  # a float, as in SD2.1


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("tiny-sd1", "model.diffusion_model.input_blocks.1.1.proj_in.weight"),
        ("tiny-sd1", "first_stage_model.decoder.conv_in.weight"),
        ("tiny-sd1", "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"),
        ("tiny-sd2", "cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.weight"),
    ],
)
def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tiny, tmp_path, name, key):
    from trainer.runtime.errors import ModelLoadError

    save_single_file(tiny[name], tmp_path / "m.safetensors", half=False)
    sd = load_file(str(tmp_path / "m.safetensors"))
    right = list(sd[key].shape)
    sd[key] = torch.zeros(right[0] + 1, *right[1:])
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path))
    message = str(e.value)
    assert str(path) in message and repr(key) in message
    assert f"shape {[right[0] + 1, *right[1:]]}" in message and f"needs {right}" in message


def test_corrupt_pickles_are_reported_as_corrupt_not_as_unsafe(tmp_path):
    from trainer.runtime.errors import ModelLoadError

    torch.save({"state_dict": {"x": torch.ones(3)}}, tmp_path / "ok.ckpt")
    data = (tmp_path / "ok.ckpt").read_bytes()
    cases = {
        "truncated.ckpt": data[: len(data) // 2],
        "garbage.bin": b"\x00\x01 not a pickle" * 8,  # legacy-format pickle path
        "empty.ckpt": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ModelLoadError) as e:
            load_model(str(path))
        assert str(path) in str(e.value) and "is corrupt" in str(e.value), name
        assert "unsafe" not in str(e.value), name


@pytest.mark.parametrize(("name", "full"), [("tiny-sd1", "sd15"), ("tiny-sd2", "sd21")])
def test_tiny_single_files_use_exactly_the_published_key_names(tiny, tmp_path, name, full):
    """Tiny models keep SD's topology, so every conversion path is the real one: the published
    UNet and VAE key names (less the shortcuts their narrower widths make unneeded), and the
    published text-encoder names for the layers they have."""
    c = tiny[name]
    save_single_file(c, tmp_path / "m.safetensors", half=False)
    ours = set(load_file(str(tmp_path / "m.safetensors")))
    published = set(_full_size_export(full))
    unet = "model.diffusion_model."
    # The tiny UNet's third level keeps the second's width (channel multipliers 1,2,2,2, not
    # 1,2,4,4), so the first resnet there needs no 1x1 shortcut: the only published keys it lacks.
    assert {k for k in published if k.startswith(unet)} - ours == {
        f"{unet}input_blocks.7.0.skip_connection.weight",
        f"{unet}input_blocks.7.0.skip_connection.bias",
    }
    assert {k for k in ours if k.startswith(unet)} <= published
    vae = "first_stage_model."  # the same for the tiny VAE (16,32,32,32 rather than 128,256,512,512)
    assert {k for k in published if k.startswith(vae)} - ours == {
        f"{vae}{side}.block.0.nin_shortcut.{kind}"
        for side in ("encoder.down.2", "decoder.up.1")
        for kind in ("weight", "bias")
    }
    assert {k for k in ours if k.startswith(vae)} <= published
    layers = c.text_encoder.config.num_hidden_layers + (1 if c.family == "sd2" else 0)
    block = "transformer.resblocks." if c.family == "sd2" else "encoder.layers."

    def in_range(key: str) -> bool:
        return block not in key or int(key.split(block)[1].split(".")[0]) < layers

    assert {k for k in ours if k.startswith("cond_stage_model.")} == {
        k for k in published if k.startswith("cond_stage_model.") and in_range(k)
    }


def test_pipeline_folder_has_the_published_components(tiny, tmp_path):
    save_pipeline(tiny["tiny-sd2"], tmp_path / "pipe")
    root = tmp_path / "pipe"
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    for part, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")):
        assert (root / part / "config.json").is_file() and (root / part / f"{weights}.safetensors").is_file()
    # transformers 4 tools read the slow tokenizer's files; diffusers needs model_max_length 77
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {
        p.name for p in (root / "tokenizer").iterdir()
    }
    assert json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 77
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["steps_offset"] == 1
