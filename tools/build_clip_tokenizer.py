"""Build the CLIP BPE tokenizer files shipped in mlsd/data/clip_tokenizer.

Run once, offline, from the ``bpe_simple_vocab_16e6.txt.gz`` that the
open-clip-torch / clip-anytorch wheels carry (OpenAI's CLIP merges list):

    python tools/build_clip_tokenizer.py path/to/bpe_simple_vocab_16e6.txt.gz

It writes ``vocab.json`` and ``merges.txt`` in the layout transformers'
``CLIPTokenizer`` reads: 256 byte symbols, the same with ``</w>``, one entry per
merge, then the two special tokens (49408 entries in all).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2
OUT = Path(__file__).resolve().parent.parent / "mlsd" / "data" / "clip_tokenizer"


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable unicode table, in its canonical order."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def main(source: str) -> None:
    lines = gzip.open(source, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : N_MERGES + 1]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {OUT}/vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges)")


if __name__ == "__main__":
    main(sys.argv[1])
