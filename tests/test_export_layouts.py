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
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import DDIMScheduler  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from trainer.diffusion import NoiseSchedule  # noqa: E402
from trainer.models import load_model, save_pipeline, save_single_file  # noqa: E402
from trainer.models.saving import inference_scheduler  # noqa: E402


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
    from trainer.loop import train
    from trainer.session import build_session

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
