"""Derive the bundled CLIP BPE `vocab.json` / `merges.txt` from open-clip-torch's vocabulary.

Run once by a maintainer (not at run time): the trainer must tokenize offline without
depending on open-clip-torch (which pulls torchvision). The construction is exactly the one
OpenAI's CLIP `SimpleTokenizer` uses and that the Hugging Face CLIP tokenizer files encode:
256 byte symbols (GPT-2 byte-to-unicode map), their 256 `</w>` forms, one token per merge for
merges[1 : 49152 - 256 - 2 + 1], then `<|startoftext|>` and `<|endoftext|>`: 49408 tokens.

    python tools/derive_vocab.py /path/to/bpe_simple_vocab_16e6.txt.gz
"""

import gzip
import json
import sys
from pathlib import Path

VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (as in CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def derive(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """Return (token -> id, merge lines) built the way CLIP builds its encoder."""
    with gzip.open(bpe_gz) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise SystemExit(f"derived {len(tokens)} tokens ({len(set(tokens))} unique), expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def main() -> None:
    src = Path(sys.argv[1])
    out = Path(__file__).resolve().parents[1] / "trainer" / "models" / "tokenizer"
    vocab, merges = derive(src)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main()
