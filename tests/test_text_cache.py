"""TextEmbeddingCache: same output as encoding every time, misses only, refusal when training."""

from __future__ import annotations

import pytest
import torch

from trainer.models import build_builtin
from trainer.step.text import encode_captions
from trainer.step.text_cache import TextEmbeddingCache, text_encoder_fingerprint

LONG = " ".join(f"word{i}" for i in range(60))  # > 75 CLIP tokens: two chunks at max_token_length 150


@pytest.fixture(scope="module")
def model():
    m = build_builtin("tiny-sd1")
    m.text_encoder.requires_grad_(False).eval()
    return m


def _encoder(model, calls, max_token_length=75, clip_skip=0):
    def encode(captions):
        calls.append(list(captions))
        return encode_captions(
            model.text_encoder,
            model.tokenizer,
            captions,
            clip_skip=clip_skip,
            max_token_length=max_token_length,
            device="cpu",
        )

    return encode


@torch.no_grad()
def test_cached_equals_direct_and_encodes_misses_only(model):
    calls = []
    encode = _encoder(model, calls, clip_skip=2)
    cache = TextEmbeddingCache(text_encoder_fingerprint(model.text_encoder), clip_skip=2)
    first = cache.encode(["a cat", "a dog", "a cat"], encode)
    # duplicates within a batch are encoded once, each miss on its own (batch-independent entries)
    assert calls == [["a cat"], ["a dog"]]
    second = cache.encode(["a dog", "", "a cat"], encode)
    assert calls[2:] == [[""]]  # only the new variant (a dropped caption) is encoded
    direct = encode_captions(
        model.text_encoder, model.tokenizer, ["a dog", "", "a cat"], clip_skip=2, device="cpu"
    )
    torch.testing.assert_close(second, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[0], first[2])
    alone = TextEmbeddingCache(text_encoder_fingerprint(model.text_encoder), clip_skip=2)
    assert torch.equal(alone.encode(["a dog"], encode)[0], first[1])  # same bits whatever the batch
    assert (cache.hits, cache.misses, len(cache)) == (2, 4, 3)


@torch.no_grad()
def test_long_captions_are_padded_like_a_batched_encode(model):
    calls = []
    cache = TextEmbeddingCache("fp", max_token_length=150)
    encode = _encoder(model, calls, max_token_length=150)
    cache.encode(["short"], encode)  # cached alone: one chunk
    mixed = cache.encode(["short", LONG], encode)
    direct = encode_captions(
        model.text_encoder, model.tokenizer, ["short", LONG], max_token_length=150, device="cpu"
    )
    assert mixed.shape == direct.shape == (2, 154, direct.shape[-1])
    torch.testing.assert_close(mixed, direct, rtol=1e-5, atol=1e-5)
    assert cache.encode(["short"], encode).shape[1] == 77  # a short-only batch stays one chunk


def test_key_separates_settings_and_weights(model):
    a = TextEmbeddingCache("fp-a", clip_skip=0)
    assert a.key("x") != TextEmbeddingCache("fp-a", clip_skip=2).key("x")
    assert a.key("x") != TextEmbeddingCache("fp-a", max_token_length=150).key("x")
    assert a.key("x") != TextEmbeddingCache("fp-b").key("x")
    before = text_encoder_fingerprint(model.text_encoder)
    changed = build_builtin("tiny-sd1").text_encoder
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    assert text_encoder_fingerprint(changed) != before


def test_refuses_a_trainable_text_encoder(model):
    weight = torch.nn.Parameter(torch.ones(1))

    def trainable(captions):
        with torch.enable_grad():
            return torch.zeros(len(captions), 77, 4) * weight

    with pytest.raises(AssertionError, match="frozen text encoder"):  # config.py refuses it first
        TextEmbeddingCache("fp").encode(["a"], trainable)
