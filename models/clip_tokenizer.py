"""IRRA's text tokenizer: CLIP byte-level BPE with IRRA's own vocabulary, bit for bit.

Official behaviour reproduced (IRRA ``utils/simple_tokenizer.py`` and ``datasets/bases.py:tokenize``):

- cleaning: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse whitespace, lower-case;
- pre-tokenising with CLIP's regex plus the special token ``<|mask|>`` (every digit is its own token);
- byte-level BPE with the first 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz``;
- vocabulary: 256 byte tokens, the same 256 with ``</w>``, the merges, then the last entry (``jekyll</w>``)
  dropped and ``<|mask|>`` = 49405, ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407 appended; every
  other id equals CLIP's;
- ``[SOT] + bpe + [EOT]``; longer than 77 -> keep the first 77 and overwrite the last with EOT; pad with 0.

One deliberate difference: the official code raises ``KeyError`` on the word "jekyll" (its last merge makes a
token that is no longer in the vocabulary). Here that merge is never applied, so "jekyll" becomes the two
tokens the merge would have joined; every text the official code accepts gets the same ids.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

from models.tokenizers import clip_bpe_path

NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file
MASK_ID = 49405
SOT_ID = 49406
EOT_ID = 49407
CONTEXT_LENGTH = 77

# CLIP's pre-tokenisation pattern with IRRA's extra <|mask|> special token.
_TOKEN_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|mask\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_SPECIAL_TOKENS = ("<|startoftext|>", "<|mask|>", "<|endoftext|>")


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the remaining bytes map, in
    increasing order, to code points 256, 257, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}  # insertion order = vocabulary order of the byte tokens
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


def clean_text(text: str) -> str:
    """ftfy fix, HTML-unescape twice, collapse whitespace, strip, lower-case (official order)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = regex.sub(r"\s+", " ", text).strip()
    return text.lower()


class IRRATokenizer:
    """CLIP BPE with IRRA's vocabulary (``<|mask|>`` = 49405; ``jekyll</w>`` removed)."""

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = CONTEXT_LENGTH):
        self.context_length = context_length
        self.byte_encoder = byte_to_unicode()
        with gzip.open(bpe_path or clip_bpe_path(), "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
        base = list(self.byte_encoder.values())
        vocab = base + [b + "</w>" for b in base] + ["".join(pair) for pair in merges]
        vocab.pop()  # IRRA drops the last merge token ('jekyll</w>') to make room for <|mask|>
        vocab += ["<|mask|>", "<|startoftext|>", "<|endoftext|>"]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: token for token, i in self.encoder.items()}
        # the dropped token's merge is left out, so BPE never produces a token without an id
        self.merge_ranks: dict[tuple[str, str], int] = {
            pair: rank for rank, pair in enumerate(merges) if "".join(pair) in self.encoder
        }
        self._cache: dict[str, list[str]] = {token: [token] for token in _SPECIAL_TOKENS}
        special_ids = (self.encoder["<|mask|>"], self.encoder["<|endoftext|>"], len(self.encoder))
        if special_ids != (MASK_ID, EOT_ID, 49408):
            raise ValueError(f"{bpe_path or clip_bpe_path()} is not CLIP's bpe_simple_vocab_16e6 merges file")

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> list[str]:
        """Merge the symbols of one pre-token (already byte-mapped), lowest merge rank first, until no pair
        of neighbours has a rank. The last symbol carries the end-of-word marker ``</w>``."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            neighbours = zip(symbols, symbols[1:], strict=False)
            candidates = [(self.merge_ranks[pair], pair) for pair in neighbours if pair in self.merge_ranks]
            if not candidates:
                break
            _, (first, second) = min(candidates)
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """BPE ids of a caption, without SOT/EOT."""
        ids: list[int] = []
        for piece in _TOKEN_PATTERN.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(mapped))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Inverse of ``encode`` up to cleaning; ``</w>`` becomes a space."""
        # special tokens and '</w>' are printable ASCII, which the byte map leaves unchanged
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        text = "".join(self.decoder[i] for i in ids)
        return bytes(byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def tokenize(self, text: str) -> np.ndarray:
        """One caption -> int64 [context_length]: SOT, BPE, EOT; truncated with EOT forced last; 0-padded."""
        ids = [SOT_ID, *self.encode(text), EOT_ID]
        if len(ids) > self.context_length:
            ids = ids[: self.context_length]
            ids[-1] = EOT_ID
        out = np.zeros(self.context_length, dtype=np.int64)
        out[: len(ids)] = ids
        return out

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        """Captions -> int64 [N, context_length]."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return np.zeros((0, self.context_length), dtype=np.int64)
        return np.stack([self.tokenize(t) for t in texts])


@lru_cache(maxsize=2)
def irra_tokenizer(context_length: int = CONTEXT_LENGTH) -> IRRATokenizer:
    """The shared tokenizer instance (reading the merges file takes about a second)."""
    return IRRATokenizer(context_length=context_length)
