"""attn_type: sdp / xformers / slice set the kernels they name, and never fall back silently."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, SlicedAttnProcessor
from diffusers.utils import is_xformers_available

from trainer.models import load_model
from trainer.parts import attention
from trainer.parts.attention import configure_attention
from trainer.parts.lean_blocks import LeanAttnProcessor
from trainer.runtime.errors import ConfigError


@pytest.fixture(scope="module")
def model():
    return load_model("builtin:tiny-sd1")


def _processor_types(unet) -> set[type]:
    return {type(p) for p in unet.attn_processors.values()}


def _unet_out(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 900]), ctx).sample


def test_sdp_sets_sdpa_processors_everywhere_and_logs_backends(model, caplog):
    unet, te = model.unet, model.text_encoder
    unet.set_attn_processor(AttnProcessor())  # start from something else
    te.set_attn_implementation("eager")
    with caplog.at_level(logging.INFO, logger="trainer.parts.attention"):
        desc = configure_attention(unet, te, "sdp")
    assert _processor_types(unet) == {LeanAttnProcessor}
    assert len(unet.attn_processors) > 0
    assert te.config._attn_implementation == "sdpa"
    assert "sdp" in desc and "cpu: fused" in desc and "text encoder: sdpa" in desc
    assert desc in caplog.text


def test_slice_sets_sliced_processors_with_half_the_heads_and_same_output(model):
    unet, te = model.unet, model.text_encoder
    configure_attention(unet, te, "sdp")
    reference = _unet_out(unet)
    desc = configure_attention(unet, te, "slice")
    procs = list(unet.attn_processors.values())
    assert {type(p) for p in procs} == {SlicedAttnProcessor}
    heads = unet.config.attention_head_dim  # SD1 configs store the head count here
    assert {p.slice_size for p in procs} == {heads // 2}
    assert "sliced" in desc
    torch.testing.assert_close(_unet_out(unet), reference, atol=1e-5, rtol=1e-5)
    configure_attention(unet, te, "sdp")
    assert _processor_types(unet) == {LeanAttnProcessor}


def test_xformers_missing_is_a_config_error_naming_attn_type(model, monkeypatch):
    monkeypatch.setattr(attention, "is_xformers_available", lambda: False)
    configure_attention(model.unet, model.text_encoder, "sdp")
    with pytest.raises(ConfigError) as err:
        configure_attention(model.unet, model.text_encoder, "xformers")
    msg = str(err.value)
    assert "attn_type 'xformers'" in msg and "pip install xformers" in msg and "attn_type sdp" in msg
    assert _processor_types(model.unet) == {LeanAttnProcessor}  # nothing was changed


def test_xformers_installed_but_no_cuda_is_a_config_error(model, monkeypatch):
    monkeypatch.setattr(attention, "is_xformers_available", lambda: True)
    with pytest.raises(
        ConfigError, match="attn_type 'xformers' needs a CUDA device but training runs on cpu"
    ):
        configure_attention(model.unet, model.text_encoder, "xformers")


@pytest.mark.skipif(
    torch.cuda.is_available() and is_xformers_available(), reason="xformers really runs on this machine"
)
def test_xformers_that_cannot_run_is_a_config_error_not_a_fallback(model, monkeypatch):
    """Installed per the check but failing inside diffusers (here: no CUDA to test-run on)."""
    monkeypatch.setattr(attention, "is_xformers_available", lambda: True)
    configure_attention(model.unet, model.text_encoder, "sdp")
    with pytest.raises(ConfigError, match="attn_type 'xformers': xformers is installed but cannot run here"):
        configure_attention(model.unet, model.text_encoder, "xformers", device="cuda")
    assert _processor_types(model.unet) == {LeanAttnProcessor}


def test_configure_before_moving_uses_the_given_device_and_survives_to(model):
    unet = model.unet
    configure_attention(unet, model.text_encoder, "slice", device="cpu")
    unet.to(torch.float64).to(torch.float32)  # a move keeps the processors
    assert _processor_types(unet) == {SlicedAttnProcessor}
    configure_attention(unet, model.text_encoder, "sdp")


def test_unknown_attn_type_is_rejected(model):
    with pytest.raises(ConfigError, match="attn_type 'flash'"):
        configure_attention(model.unet, model.text_encoder, "flash")


def _config(tmp_path, **overrides):
    from tests.helpers import ROOT, base_args
    from trainer.config import load_config

    return load_config(
        str(ROOT / "train.json"), base_args(tmp_path, resolution=64, cache_latents=False, **overrides)
    )


def test_the_session_applies_attn_type(tmp_path):
    from trainer.run.session import build_session

    session = build_session(_config(tmp_path, attn_type="slice"))
    assert _processor_types(session.model.unet) == {SlicedAttnProcessor}


def test_unavailable_xformers_fails_before_a_run_folder_exists(tmp_path, monkeypatch):
    from trainer.run.session import build_session

    monkeypatch.setattr(attention, "is_xformers_available", lambda: False)
    with pytest.raises(ConfigError, match="attn_type 'xformers'"):
        build_session(_config(tmp_path, attn_type="xformers"))
    logs = tmp_path / "logs"
    assert not [p for p in logs.glob("*") if not p.name.startswith(".")] if logs.exists() else True
