"""Text conditioning: captions -> CLIP hidden states for the UNet's cross-attention.

Long captions (max_token_length 150 / 225) are split into 75-token chunks the A1111 way: each
chunk becomes its own 77-token sequence `BOS + 75 tokens + EOS/pad`, all chunks go through the
text encoder in one batched forward, and the outputs are concatenated along the sequence, giving
(B, 77 * k, D). Inner BOS/EOS states are kept (kohya instead drops them and returns
`max_token_length + 2` positions); keeping them makes training see exactly what A1111 / ComfyUI
produce at inference. k is the smallest number of chunks that holds the longest caption in the
batch (at most max_token_length / 75), so a batch of short captions encodes bitwise like the
plain 77-token encoding.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from trainer.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 75
ALLOWED_MAX_TOKEN_LENGTHS = (75, 150, 225)


def token_count(tokenizer, caption: str) -> int:
    """Number of CLIP tokens in `caption`, excluding BOS/EOS (for start-up truncation reports)."""
    return len(tokenizer(caption, add_special_tokens=False, truncation=False)["input_ids"])


def chunked_input_ids(tokenizer, captions: list[str], *, max_token_length: int = 75) -> Tensor:
    """Token ids of shape (B, k, 77): per caption, k chunks of BOS + <=75 tokens + EOS + padding.

    Tokens past `max_token_length` are dropped (log at debug level; use `token_count` to report
    them once at start-up).
    """
    if max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise ConfigError(
            f"max_token_length={max_token_length}: use one of {', '.join(map(str, ALLOWED_MAX_TOKEN_LENGTHS))}."
        )
    seq_len = CHUNK_TOKENS + 2
    if tokenizer.model_max_length != seq_len:
        raise ConfigError(
            f"tokenizer model_max_length is {tokenizer.model_max_length}, expected {seq_len}; "
            "set model_max_length: 77 in the tokenizer's tokenizer_config.json."
        )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # One token past the limit is kept so truncation can be detected without a tokenizer warning.
    token_lists = tokenizer(
        list(captions), add_special_tokens=False, truncation=True, max_length=max_token_length + 1
    )["input_ids"]
    truncated = sum(len(t) > max_token_length for t in token_lists)
    if truncated:
        logger.debug("%d caption(s) longer than %d tokens were truncated", truncated, max_token_length)
    token_lists = [t[:max_token_length] for t in token_lists]
    longest = max((len(t) for t in token_lists), default=0)
    k = max(1, math.ceil(longest / CHUNK_TOKENS))
    rows = []
    for tokens in token_lists:
        chunks = []
        for i in range(k):
            body = tokens[i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS]
            chunk = [bos, *body, eos]
            chunks.append(chunk + [pad] * (seq_len - len(chunk)))
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.long)


def _final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    """CLIP's final LayerNorm: `text_model.final_layer_norm` in transformers 4.x, top-level in 5.x."""
    inner = _unwrap(text_encoder)
    norm = getattr(getattr(inner, "text_model", inner), "final_layer_norm", None)
    if not isinstance(norm, nn.Module):
        raise ConfigError(
            f"clip_skip >= 2 needs a CLIP text encoder; {type(inner).__name__} has no final_layer_norm"
        )
    return norm


def _num_layers(text_encoder: nn.Module) -> int:
    """The encoder's layer count (`config.num_hidden_layers` of a transformers model)."""
    inner = _unwrap(text_encoder)
    layers = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise ConfigError(f"the text encoder ({type(inner).__name__}) has no config.num_hidden_layers")
    return layers


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the forward still goes through DDP)."""
    return getattr(module, "module", module)


def encode_captions(
    text_encoder: nn.Module,
    tokenizer,
    captions: list[str],
    *,
    clip_skip: int = 0,
    max_token_length: int = 75,
    device: torch.device | str,
) -> Tensor:
    """Encode captions to (B, 77 * k, D) hidden states.

    clip_skip 0 or 1: the encoder's `last_hidden_state`. clip_skip k >= 2:
    `final_layer_norm(hidden_states[-k])` (ED2 / A1111 rule: 2 = the penultimate layer). For
    SD2.x the diffusers config already has 23 of 24 layers, so 2 goes one further back.
    """
    num_layers = _num_layers(text_encoder)
    if not 0 <= clip_skip <= num_layers:
        raise ConfigError(
            f"clip_skip={clip_skip}: must be between 0 and {num_layers} (the text encoder's layers)."
        )
    ids = chunked_input_ids(tokenizer, captions, max_token_length=max_token_length)
    batch, k, seq_len = ids.shape
    flat = ids.reshape(batch * k, seq_len).to(device)
    if clip_skip >= 2:
        out = text_encoder(flat, output_hidden_states=True)
        hidden = _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    else:
        hidden = text_encoder(flat).last_hidden_state
    return hidden.reshape(batch, k * seq_len, hidden.shape[-1])


def perturb_embeddings(emb: Tensor, gamma: float, generator: torch.Generator) -> Tensor:
    """emb + N(0, 1) * gamma / sqrt(D) (embedding perturbation, arXiv 2405.20494).

    The noise is drawn on the generator's device and moved. gamma == 0 returns `emb` and draws
    nothing (so the RNG stream does not depend on an inactive option).
    """
    if gamma < 0:
        raise ConfigError(f"embedding_perturbation={gamma}: must be >= 0.")
    if gamma == 0:
        return emb
    noise = torch.randn(emb.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return emb + noise.to(device=emb.device, dtype=emb.dtype) * (gamma / math.sqrt(emb.shape[-1]))
