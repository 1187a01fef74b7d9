"""Text-encoder output cache: encode each distinct caption once when the text encoder is frozen.

When the text encoder does not train, its output for a caption never changes, so encoding the
same caption every epoch is wasted work (a CLIP forward per sample per step). This cache keeps
the hidden states of every caption it has seen, in memory, and encodes only the misses.

When it applies, and when it does not:

* Only with a **frozen** text encoder (`disable_textenc_training`, or `text_encoder_freezing`
  that freezes everything). `encode` refuses outputs that carry a gradient, because caching a
  trainable encoder's output would silently stop it training.
* It pays when captions repeat, i.e. from the second epoch on. Batch-time caption processing
  (`cond_dropout` -> "", `shuffle_tags` -> a permutation, caption sampling from yaml) makes
  variants: the key is the caption *after* that processing, so each variant is a separate entry
  (a dropped caption is the single entry ""). With `shuffle_tags` on many tags, variants rarely
  repeat and the cache mostly misses (it is still correct, only less useful).
* The key is (caption, clip_skip, max_token_length, text-encoder fingerprint). The fingerprint
  must change whenever the weights do (see `text_encoder_fingerprint`).
* `embedding_perturbation` must be applied to the cached output, not inside `encode_fn`
  (it draws fresh noise every step).

Misses are encoded **one caption at a time**, so an entry is a function of its caption alone,
not of which other captions shared its batch (batched matmuls are not bit-identical across batch
sizes). That keeps a resumed run, whose cache starts empty, bitwise equal to an uninterrupted
one. The cost is paid once per distinct caption.

Long captions (max_token_length 150/225) are encoded as k chunks of 77 tokens, where k is set by
the longest caption of the *batch*; a shorter caption is padded with empty chunks (BOS, EOS,
padding), whose encoding does not depend on the caption. The cache therefore stores each caption
at its own length and pads with the cached encoding of "" (exactly one empty chunk) when a batch
mixes lengths.

Memory: 77 x hidden_size values per caption (SD1.5 fp32: 236 KB; fp16: 118 KB), so 10k distinct
captions take ~1.2-2.4 GB; pass `storage_device="cpu"` to keep entries in host memory.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainer.step.text import CHUNK_TOKENS

logger = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], Tensor]  # captions -> (B, 77 * k, D), no gradient
SEQ_LEN = CHUNK_TOKENS + 2
EMPTY_CAPTION = ""


def text_encoder_fingerprint(text_encoder: nn.Module, source: str = "") -> str:
    """A short hash of the encoder's weights (a sample of every tensor) and its source name.

    Cheap enough to call at start-up on SD-size encoders; changes when any tensor's leading
    values, shape or dtype change, which is what a different checkpoint or fine-tune does.
    """
    h = hashlib.sha256(source.encode())
    for name, tensor in text_encoder.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().flatten()[:32].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class TextEmbeddingCache:
    """Hidden states per caption for one frozen text encoder and one set of encode settings."""

    def __init__(
        self,
        fingerprint: str,
        *,
        clip_skip: int = 0,
        max_token_length: int = 75,
        storage_device: torch.device | str | None = None,
    ) -> None:
        if not fingerprint:
            raise ValueError("fingerprint must be a non-empty string identifying the text encoder's weights")
        self.fingerprint = fingerprint
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length
        self.storage_device = torch.device(storage_device) if storage_device is not None else None
        self._entries: dict[tuple, Tensor] = {}
        self._out_device: torch.device | None = None  # where encode_fn puts its output
        self.hits = 0
        self.misses = 0

    def key(self, caption: str) -> tuple:
        return (caption, self.clip_skip, self.max_token_length, self.fingerprint)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, caption: str) -> bool:
        return self.key(caption) in self._entries

    def clear(self) -> None:
        self._entries.clear()

    def encode(self, captions: list[str], encode_fn: EncodeFn) -> Tensor:
        """(B, 77 * k, D) hidden states for `captions`; `encode_fn` runs only on the misses.

        `encode_fn(captions)` must behave like `trainer.step.text.encode_captions` with this cache's
        clip_skip and max_token_length, on a frozen encoder. The result is on the device and in
        the dtype `encode_fn` returned.
        """
        if not captions:
            raise ValueError("encode() needs at least one caption")
        wanted = list(dict.fromkeys(captions))
        missing = [c for c in wanted if self.key(c) not in self._entries]
        self.hits += len(captions) - sum(captions.count(c) for c in missing)
        self.misses += sum(captions.count(c) for c in missing)
        if missing:
            self._fill(missing, encode_fn)
        rows = [self._entries[self.key(c)] for c in captions]
        longest = max(r.shape[0] for r in rows)
        if any(r.shape[0] != longest for r in rows):
            empty = self._empty_chunk(encode_fn)
            rows = [self._pad(r, longest, empty) for r in rows]
        out = torch.stack(rows)
        return out if self.storage_device is None else out.to(self._out_device, non_blocking=True)

    def fill(self, captions: list[str], encode_fn: EncodeFn) -> int:
        """Encode now every caption of `captions` not cached yet (as misses are: one at a time,
        so the entries equal those a later miss would make); returns how many were encoded."""
        missing = [c for c in dict.fromkeys(captions) if self.key(c) not in self._entries]
        self._fill(missing, encode_fn)
        return len(missing)

    def _fill(self, captions: list[str], encode_fn: EncodeFn) -> None:
        for group in ([c] for c in captions):  # one at a time: see the module docstring
            with torch.no_grad():
                out = encode_fn(group)
            # train.json validation: cache_text_encoder_outputs needs disable_textenc_training.
            assert not out.requires_grad, (
                "TextEmbeddingCache: the text encoder is training; only use the cache with a frozen text encoder"
            )
            if out.ndim != 3 or out.shape[0] != len(group) or out.shape[1] % SEQ_LEN:
                raise ValueError(
                    f"encode_fn returned shape {tuple(out.shape)} for {len(group)} caption(s); expected "
                    f"(B, 77 * k, D)"
                )
            self._out_device = out.device
            for caption, row in zip(group, out, strict=True):
                stored = row.detach() if self.storage_device is None else row.detach().to(self.storage_device)
                self._entries[self.key(caption)] = stored.clone()

    def _empty_chunk(self, encode_fn: EncodeFn) -> Tensor:
        """The encoding of one empty chunk (BOS, EOS, padding) = the cached entry for ""."""
        if self.key(EMPTY_CAPTION) not in self._entries:
            self._fill([EMPTY_CAPTION], encode_fn)
        return self._entries[self.key(EMPTY_CAPTION)]

    @staticmethod
    def _pad(row: Tensor, length: int, empty: Tensor) -> Tensor:
        if row.shape[0] == length:
            return row
        repeats = (length - row.shape[0]) // SEQ_LEN
        return torch.cat([row, empty.to(row.dtype).repeat(repeats, 1)])
