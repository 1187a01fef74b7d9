"""trainer/step/text.py: caption encoding (clip_skip, 75-token chunks) and embedding perturbation."""

import pytest
import torch
from helpers import bundled_tokenizer, tiny_text_encoder
from transformers import CLIPTextModel

from trainer.runtime.errors import ConfigError
from trainer.step.text import chunked_input_ids, encode_captions, perturb_embeddings, token_count


def make_text_encoder(tokenizer, layers: int = 3) -> CLIPTextModel:
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return tiny_text_encoder(layers, vocab_size=len(tokenizer), **ids).eval()


@pytest.fixture
def tok(tmp_path):
    return bundled_tokenizer()


@pytest.fixture
def te(tok):
    return make_text_encoder(tok)


SHORT = ["a photo of a cat", "a red car, parked on a street at night"]


def long_caption(words: int) -> str:
    return " ".join(f"word{i % 10}" if i % 3 else "tree" for i in range(words))


@torch.no_grad()
def test_75_tokens_equals_plain_single_pass(tok, te):
    ids = tok(SHORT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    expected = te(ids).last_hidden_state
    got = encode_captions(te, tok, SHORT, device="cpu")
    assert got.shape == (2, 77, 32)
    assert torch.equal(got, expected)


@torch.no_grad()
def test_long_token_budget_with_short_captions_equals_75(tok, te):
    base = encode_captions(te, tok, SHORT, device="cpu")
    for budget in (150, 225):
        assert torch.equal(encode_captions(te, tok, SHORT, max_token_length=budget, device="cpu"), base)


def test_chunk_layout_is_bos_75_eos_pad(tok):
    caption = long_caption(120)
    tokens = tok(caption, add_special_tokens=False).input_ids
    assert len(tokens) > 150  # needs three chunks at 225, is cut at 150
    ids = chunked_input_ids(tok, [caption, "a cat"], max_token_length=150)
    assert ids.shape == (2, 2, 77)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert ids[0, 0].tolist() == [bos, *tokens[:75], eos]
    assert ids[0, 1].tolist() == [bos, *tokens[75:150], eos]
    short = tok("a cat", add_special_tokens=False).input_ids
    assert ids[1, 0].tolist() == [bos, *short, eos] + [pad] * (75 - len(short))
    assert ids[1, 1].tolist() == [bos, eos] + [pad] * 75
    assert chunked_input_ids(tok, [caption], max_token_length=225).shape == (1, 3, 77)
    assert token_count(tok, caption) == len(tokens)


@torch.no_grad()
def test_long_caption_chunks_are_encoded_separately(tok, te):
    caption = long_caption(80)
    got = encode_captions(te, tok, [caption], max_token_length=225, device="cpu")
    ids = chunked_input_ids(tok, [caption], max_token_length=225)
    k = ids.shape[1]
    assert k >= 2 and got.shape == (1, 77 * k, 32)
    for i in range(k):
        single = te(ids[:, i]).last_hidden_state
        torch.testing.assert_close(got[:, 77 * i : 77 * (i + 1)], single)
    # at 75 the same caption is truncated to one chunk equal to the tokenizer's own truncation
    plain = tok(
        [caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(encode_captions(te, tok, [caption], device="cpu"), te(plain).last_hidden_state)


@torch.no_grad()
def test_clip_skip_picks_the_layer(tok, te):
    ids = tok(SHORT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    last = encode_captions(te, tok, SHORT, device="cpu")
    assert torch.equal(encode_captions(te, tok, SHORT, clip_skip=1, device="cpu"), last)
    # clip_skip 2 == a model with the last layer removed (final layer norm still applied)
    shorter = make_text_encoder(tok, layers=2)
    shorter.load_state_dict(te.state_dict(), strict=False)
    skip2 = encode_captions(te, tok, SHORT, clip_skip=2, device="cpu")
    torch.testing.assert_close(skip2, shorter(ids).last_hidden_state)
    assert not torch.allclose(skip2, last)
    hidden = te(ids, output_hidden_states=True).hidden_states
    skip3 = encode_captions(te, tok, SHORT, clip_skip=3, device="cpu")
    torch.testing.assert_close(skip3, getattr(te, "text_model", te).final_layer_norm(hidden[-3]))
    with pytest.raises(ConfigError, match="clip_skip"):
        encode_captions(te, tok, SHORT, clip_skip=5, device="cpu")
    with pytest.raises(ConfigError, match="max_token_length"):
        encode_captions(te, tok, SHORT, max_token_length=100, device="cpu")


def test_perturb_embeddings_scale_and_rng():
    emb = torch.zeros(64, 77, 256)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert perturb_embeddings(emb, 0.0, g) is emb
    assert torch.equal(g.get_state(), state)  # gamma 0 draws nothing
    out = perturb_embeddings(emb, 0.5, g)
    assert out.std().item() == pytest.approx(0.5 / 16, rel=0.01)
    again = perturb_embeddings(emb, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(ConfigError, match="embedding_perturbation"):
        perturb_embeddings(emb, -1.0, g)
