"""The lean attention and ResNet forwards are bitwise equal to diffusers' own, and cover SD's blocks.

Each test compares a model with the lean forwards against a second load of the same model with
diffusers' forwards, on the same inputs: outputs and every parameter's gradient must be equal to
the bit, forward with autograd, forward without it (where the ResNet block works in place), and
the VAE's encode and decode.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D

from trainer.models import load_model
from trainer.parts.attention import configure_attention
from trainer.parts.lean_blocks import (
    LeanAttnProcessor,
    LeanResnetBlock2D,
    attention_eligible,
    attention_processors,
    use_generic_blocks,
    use_lean_blocks,
    use_lean_resnets,
)


def _pair(spec: str):
    lean, generic = load_model(spec), load_model(spec)
    configure_attention(lean.unet, lean.text_encoder, "sdp")
    use_lean_blocks(lean.unet, lean.vae)
    use_generic_blocks(generic.unet, generic.vae)
    return lean, generic


def _unet_inputs(unet, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    return x, torch.tensor([10, 900]), ctx


def _fwd_bwd(unet, inputs):
    unet.zero_grad(set_to_none=True)
    out = unet(*inputs).sample
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in unet.named_parameters()}


@pytest.mark.parametrize("spec", ["builtin:tiny-sd1", "builtin:tiny-sd2"])
def test_unet_forward_and_gradients_are_bitwise_equal(spec):
    lean, generic = _pair(spec)
    kinds = {type(p) for p in lean.unet.attn_processors.values()}
    assert kinds == {LeanAttnProcessor}, "every SD UNet attention layer takes the lean path"
    assert any(isinstance(m, LeanResnetBlock2D) for m in lean.unet.modules())
    assert not any(isinstance(m, LeanResnetBlock2D) for m in generic.unet.modules())
    inputs = _unet_inputs(lean.unet)
    out_lean, grads_lean = _fwd_bwd(lean.unet, inputs)
    out_generic, grads_generic = _fwd_bwd(generic.unet, inputs)
    assert torch.equal(out_lean, out_generic)
    assert grads_lean.keys() == grads_generic.keys()
    for name, grad in grads_lean.items():
        assert grad is not None and torch.equal(grad, grads_generic[name]), name
    with torch.no_grad():  # the in-place path
        assert torch.equal(lean.unet(*inputs).sample, generic.unet(*inputs).sample)


@pytest.mark.parametrize("spec", ["builtin:tiny-sd1", "builtin:tiny-sd2"])
def test_vae_encode_and_decode_are_bitwise_equal(spec):
    lean, generic = _pair(spec)
    blocks = [m for m in lean.vae.modules() if isinstance(m, ResnetBlock2D)]
    assert blocks and all(type(m) is LeanResnetBlock2D for m in blocks)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean_lean = lean.vae.encode(pixels).latent_dist.mean
        mean_generic = generic.vae.encode(pixels).latent_dist.mean
        assert torch.equal(mean_lean, mean_generic)
        assert torch.equal(lean.vae.decode(mean_lean).sample, generic.vae.decode(mean_generic).sample)
    # with autograd (a loss through the decoder): the out-of-place path, same gradients
    latents = mean_lean.clone().requires_grad_(True)
    lean.vae.decode(latents).sample.sum().backward()
    reference = mean_generic.clone().requires_grad_(True)
    generic.vae.decode(reference).sample.sum().backward()
    assert torch.equal(latents.grad, reference.grad)


def test_blocks_whose_extras_are_not_identities_keep_diffusers_forward():
    scaled = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4, output_scale_factor=2.0)
    shifted = ResnetBlock2D(
        in_channels=8, out_channels=8, temb_channels=16, groups=4, time_embedding_norm="scale_shift"
    )
    sampled = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4, down=True)
    plain = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=16, groups=4)
    holder = torch.nn.ModuleList([scaled, shifted, sampled, plain])
    assert use_lean_resnets(holder) == 1
    assert [type(b) for b in holder] == [ResnetBlock2D, ResnetBlock2D, ResnetBlock2D, LeanResnetBlock2D]
    x, temb = torch.randn(2, 8, 8, 8), torch.randn(2, 16)
    reference = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=16, groups=4)
    reference.load_state_dict(plain.state_dict())
    assert torch.equal(plain(x, temb), reference(x, temb))  # conv_shortcut path too


def test_an_attention_layer_with_a_residual_or_a_mask_takes_the_generic_path():
    model = load_model("builtin:tiny-sd1")
    vae_attention = model.vae.encoder.mid_block.attentions[0]  # group norm + residual connection
    unet_attention = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    procs = attention_processors(model.unet)
    assert {type(p) for p in procs.values()} == {LeanAttnProcessor}
    assert not attention_eligible(vae_attention) and attention_eligible(unet_attention)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 16, unet_attention.query_dim, generator=gen)
    context = torch.randn(2, 77, unet_attention.cross_attention_dim, generator=gen)
    mask = torch.ones(2, 77, dtype=torch.bool)
    mask[:, 40:] = False
    with torch.no_grad():
        lean = LeanAttnProcessor()(unet_attention, hidden, context, attention_mask=mask)
        generic = AttnProcessor2_0()(unet_attention, hidden, context, attention_mask=mask)
    assert torch.equal(lean, generic)


def test_a_deep_copy_keeps_the_lean_forwards_and_their_results():
    lean, _ = _pair("builtin:tiny-sd1")
    clone = copy.deepcopy(lean.unet)
    assert any(type(m) is LeanResnetBlock2D for m in clone.modules())
    assert {type(p) for p in clone.attn_processors.values()} == {LeanAttnProcessor}
    inputs = _unet_inputs(lean.unet, seed=3)
    with torch.no_grad():
        assert torch.equal(clone(*inputs).sample, lean.unet(*inputs).sample)


@pytest.mark.parametrize(
    ("version", "verified"),
    [("0.42.1", True), ("0.32.0", True), ("0.31.9", False), ("0.43.0", False), ("1.0.0", False)],
)
def test_lean_forwards_are_used_only_with_the_diffusers_releases_they_were_checked_on(version, verified):
    from trainer.parts.lean_blocks import lean_forwards_verified

    assert lean_forwards_verified(version) is verified


def test_an_unchecked_diffusers_release_keeps_diffusers_forwards_and_says_so(monkeypatch, caplog):
    import diffusers

    from trainer.parts import lean_blocks

    monkeypatch.setattr(diffusers, "__version__", "0.99.0")
    lean_blocks._lean_allowed.cache_clear()
    try:
        model = load_model("builtin:tiny-sd1")
        with caplog.at_level("WARNING", logger="trainer.parts.lean_blocks"):
            configure_attention(model.unet, model.text_encoder, "sdp")
            use_lean_blocks(model.unet, model.vae)
    finally:
        lean_blocks._lean_allowed.cache_clear()
    blocks = [b for m in (model.unet, model.vae) for b in m.modules() if isinstance(b, ResnetBlock2D)]
    assert blocks and all(type(b) is ResnetBlock2D for b in blocks)
    assert not any(isinstance(p, LeanAttnProcessor) for p in model.unet.attn_processors.values())
    assert "diffusers 0.99.0 is outside the releases" in caplog.text
