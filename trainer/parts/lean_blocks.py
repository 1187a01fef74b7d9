"""Exact lean forwards for the two blocks SD's UNet and VAE repeat most: attention and ResNet.

diffusers' generic forwards carry steps that are identities for Stable Diffusion but still run
as full-tensor kernels: every attention layer divides its output by `rescale_output_factor`
(1.0) and casts it to its own dtype, every ResNet block divides its output by
`output_scale_factor` (1.0). Each division is one more pass over the activation forward and one
more backward (the gradient divided by 1.0 again). On a small model trained on the CPU these
passes are a few percent of the step; in the VAE encoder they run on the largest tensors of
the step (16 channels at full image resolution).

The lean forwards below compute the same operations in the same order without those identity
steps, so outputs and gradients are bitwise equal to diffusers' own forwards
(tests/test_lean_blocks.py checks both models of both families, forward and backward). A block
gets the lean forward only when it is one whose identity steps really are identities (the
`*_eligible` checks); any other block keeps diffusers' forward, so nothing changes for
configurations these forwards do not cover. Under `torch.no_grad()` (the VAE encode, sampling)
the ResNet block applies its activations in place, which saves an allocation and a write per
activation and is exact.

They restate diffusers' forwards, so they are used only with the diffusers releases they were
checked against (`VERIFIED_DIFFUSERS`); with any other release every block keeps diffusers' own
forward and a warning says so. Raise the bound after tests/test_lean_blocks.py passes on the new
release.
"""

from __future__ import annotations

import functools
import logging

import diffusers
import torch
import torch.nn.functional as F
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttentionProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

logger = logging.getLogger(__name__)

# [lowest, first unchecked) diffusers releases whose AttnProcessor2_0 / ResnetBlock2D forwards the
# lean ones were checked against, bitwise (tests/test_lean_blocks.py).
VERIFIED_DIFFUSERS = ((0, 32), (0, 43))


def lean_forwards_verified(version: str | None = None) -> bool:
    """True when the installed diffusers (or `version`) is one the lean forwards were checked on."""
    release = tuple(int(part) for part in (version or diffusers.__version__).split(".")[:2])
    low, high = VERIFIED_DIFFUSERS
    return low <= release < high


@functools.cache
def _lean_allowed() -> bool:
    """Once per process: with an unchecked diffusers release, say that its own forwards run."""
    if lean_forwards_verified():
        return True
    logger.warning(
        "diffusers %s is outside the releases the lean attention/ResNet forwards were checked against "
        "(%s to below %s): diffusers' own forwards run instead (the same results, a few %% slower on CPU)",
        diffusers.__version__,
        ".".join(map(str, VERIFIED_DIFFUSERS[0])),
        ".".join(map(str, VERIFIED_DIFFUSERS[1])),
    )
    return False


def attention_eligible(attn: Attention) -> bool:
    """True for an attention layer whose generic extras are all identities: SD's UNet layers."""
    return (
        attn.spatial_norm is None
        and attn.group_norm is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
        and attn.norm_q is None
        and attn.norm_k is None
        and attn.norm_cross is None
        and len(attn.to_out) == 2
    )


class LeanAttnProcessor(AttnProcessor2_0):
    """`AttnProcessor2_0` without its identity steps, for `attention_eligible` layers.

    A subclass, so code that asks `isinstance(p, AttnProcessor2_0)` still sees an SDPA
    processor. Inputs the lean path does not cover (4-d hidden states, an attention mask) go to
    the generic `AttnProcessor2_0.__call__`, which computes the same thing.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if hidden_states.ndim != 3 or attention_mask is not None or args or kwargs:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query, key, value = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


def attention_processors(unet: UNet2DConditionModel) -> dict[str, AttentionProcessor]:
    """SDPA processors for every attention layer of `unet`: lean where eligible, generic else."""
    procs: dict[str, AttentionProcessor] = {}
    allowed = _lean_allowed()
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        lean = allowed and isinstance(attn, Attention) and attention_eligible(attn)
        procs[name] = LeanAttnProcessor() if lean else AttnProcessor2_0()
    return procs


def resnet_eligible(block: nn.Module) -> bool:
    """True for a ResNet block of the plain SD kind: no resampling inside, the time embedding
    (if any) added before the second norm (not scale-shift), output scale 1. The VAE decoder's
    blocks say `time_embedding_norm="group"` and have no time embedding: the same forward."""
    return (
        isinstance(block, ResnetBlock2D)
        and block.upsample is None
        and block.downsample is None
        and block.time_embedding_norm != "scale_shift"
        and block.output_scale_factor == 1.0
        and isinstance(block.nonlinearity, nn.SiLU)
    )


class LeanResnetBlock2D(ResnetBlock2D):
    """`ResnetBlock2D.forward` for `resnet_eligible` blocks without the division by 1.0.

    Installed by changing an existing block's class (`use_lean_resnets`), so weights, hooks and
    state-dict keys stay as they are; a deep copy (EMA) keeps the lean class.
    """

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:  # the deprecated `scale` argument: let diffusers handle (and warn)
            # diffusers annotates `temb` as a Tensor, but its VAE blocks are called with None.
            return super().forward(input_tensor, temb, *args, **kwargs)  # type: ignore[arg-type]
        in_place = not torch.is_grad_enabled()  # no autograd needs the pre-activation values
        hidden = self.norm1(input_tensor)
        hidden = F.silu(hidden, inplace=True) if in_place else self.nonlinearity(hidden)
        hidden = self.conv1(hidden)
        if self.time_emb_proj is not None:
            # A block with a time projection is always called with a time embedding (the UNet's);
            # diffusers' own forward fails the same way without one.
            assert temb is not None, "ResnetBlock2D with time_emb_proj called without temb"
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if temb is not None and self.time_embedding_norm == "default":
            hidden = hidden + temb
        hidden = self.norm2(hidden)
        hidden = F.silu(hidden, inplace=True) if in_place else self.nonlinearity(hidden)
        hidden = self.dropout(hidden)
        hidden = self.conv2(hidden)
        shortcut = input_tensor
        if self.conv_shortcut is not None:
            # diffusers makes the input contiguous in training (DDP's gradient stride check)
            shortcut = self.conv_shortcut(shortcut.contiguous() if self.training else shortcut)
        return shortcut + hidden


def use_lean_resnets(module: nn.Module) -> int:
    """Give every eligible ResNet block of `module` the lean forward; return how many."""
    count = 0
    if not _lean_allowed():
        return count
    for block in module.modules():
        if type(block) is ResnetBlock2D and resnet_eligible(block):
            block.__class__ = LeanResnetBlock2D
            count += 1
    return count


def use_lean_blocks(unet: UNet2DConditionModel, vae: AutoencoderKL) -> None:
    """Lean ResNet forwards in the UNet and the VAE; logs what they cover.

    The attention processors are set by `trainer.parts.attention.configure_attention` (attn_type
    sdp), which owns the UNet's processors.
    """
    unet_blocks = use_lean_resnets(unet)
    vae_blocks = use_lean_resnets(vae)
    lean_attn = sum(isinstance(p, LeanAttnProcessor) for p in unet.attn_processors.values())
    logger.info(
        "lean forwards: %d UNet and %d VAE ResNet blocks, %d of %d attention layers",
        unet_blocks,
        vae_blocks,
        lean_attn,
        len(unet.attn_processors),
    )


def use_generic_blocks(unet: UNet2DConditionModel, vae: AutoencoderKL) -> None:
    """Undo `use_lean_blocks` and the lean attention processors: diffusers' own forwards
    everywhere (bench/step.py `--generic_blocks`, to measure what the lean forwards save)."""
    for module in (unet, vae):
        for block in module.modules():
            if type(block) is LeanResnetBlock2D:
                _use_generic_resnet(block)
    unet.set_attn_processor(AttnProcessor2_0())


def _use_generic_resnet(block: nn.Module) -> None:
    """Give a lean block diffusers' class back (a helper, as `block` here is any module: mypy
    refuses the assignment on a variable narrowed to the lean class)."""
    block.__class__ = ResnetBlock2D
