"""CLIP's byte-level BPE tokenizer (OpenAI's, as open_clip ships it), so text ids match every CLIP /
TinyCLIP checkpoint: vocabulary 49,408, `<start_of_text>` = 49406, `<end_of_text>` = 49407, context 77.

    tokens = tokenize(["a photo of a dog", "a cat"])      # LongTensor (2, 77), zero-padded

Text is cleaned as open_clip's default ("lower"): ftfy's mojibake repair, HTML entities unescaped twice,
whitespace collapsed, lower-cased.

The merges file `bpe_simple_vocab_16e6.txt.gz` is not downloaded at run time: it is read from the installed
`open-clip-torch` distribution (mlfoundations/open_clip, maintained; `make install` puts it in with `--no-deps`,
because its torchvision and timm requirements do not install against the CPU torch build), or from an
installed `clip-anytorch` / `openai-clip`. Those packages are never imported (importing them needs
torchvision); the file is found through the distribution's file list and checked by its hash.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import importlib.metadata
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import regex
import torch

__all__ = ["ClipTokenizer", "tokenize", "default_tokenizer", "vocab_file", "SOT_TOKEN", "EOT_TOKEN", "VOCAB_SIZE"]

log = logging.getLogger(__name__)

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
# sha256 of the one vocabulary file every CLIP release ships (OpenAI CLIP, open_clip, TinyCLIP: identical)
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# distributions that ship the file, in order of preference (the first is the maintained one vitnas installs)
VOCAB_DISTRIBUTIONS = ("open-clip-torch", "clip-anytorch", "openai-clip")
NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP: the file has more lines than the vocabulary takes
SOT_TOKEN, EOT_TOKEN = "<start_of_text>", "<end_of_text>"
VOCAB_SIZE = 49408
DEFAULT_CONTEXT_LENGTH = 77

# words, single digits and runs of other non-space characters, plus English contractions and the specials
_PATTERN = regex.compile(
    rf"{SOT_TOKEN}|{EOT_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE
)


def vocab_file() -> Path:
    """The installed merges file; an error naming the package to install when there is none."""
    for dist in VOCAB_DISTRIBUTIONS:
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name == VOCAB_NAME:
                path = Path(str(f.locate()))
                if path.is_file():
                    return path
    raise FileNotFoundError(
        f"CLIP's BPE vocabulary {VOCAB_NAME} was not found in any of {list(VOCAB_DISTRIBUTIONS)}: install "
        "open_clip's package, which ships it (`pip install --no-deps open-clip-torch`: vitnas only reads that file, "
        "so its torchvision / timm requirements are not needed), or pass the file as ClipTokenizer(vocab_path)"
    )


@functools.lru_cache(maxsize=1)
def _byte_table() -> dict[int, str]:
    """GPT-2's reversible byte -> character table, in vocabulary order: printable Latin-1 bytes stand for
    themselves and come first; every other byte maps to a character from 256 upwards, so BPE never sees
    whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def _clean(text: str) -> str:
    """open_clip's "lower" cleaning: mojibake repair, HTML entities, collapsed whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Text -> CLIP token ids. `encode` gives the bare ids, calling it gives the padded (N, context)
    tensor the text tower takes: `<start_of_text>` ids `<end_of_text>`, truncated so the last kept token
    is always `<end_of_text>` (the text tower pools at the argmax id, which must be it)."""

    def __init__(self, vocab_path: str | Path | None = None, *, verify: bool = True) -> None:
        path = Path(vocab_path) if vocab_path is not None else vocab_file()
        raw = path.read_bytes()
        if verify and hashlib.sha256(raw).hexdigest() != VOCAB_SHA256:
            raise ValueError(f"{path}: not CLIP's {VOCAB_NAME} (hash differs); pass verify=False to use it anyway")
        lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_to_symbol = _byte_table()
        self.symbol_to_byte = {s: b for b, s in self.byte_to_symbol.items()}
        base = list(self.byte_to_symbol.values())
        vocab = [*base, *(s + "</w>" for s in base), *("".join(m) for m in merges), SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.ranks: dict[tuple[str, ...], int] = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[SOT_TOKEN], self.encoder[EOT_TOKEN]
        self.vocab_size = len(vocab)
        self._cache: dict[str, list[str]] = {SOT_TOKEN: [SOT_TOKEN], EOT_TOKEN: [EOT_TOKEN]}

    def _bpe(self, word: str) -> list[str]:
        """Merge `word`'s symbols, lowest-ranked adjacent pair first (every occurrence, left to right),
        until no adjacent pair is a known merge. The last symbol carries the end-of-word marker."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, NUM_MERGES))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) > 100_000:  # bounded: a long-running job sees many distinct words
            self._cache = {SOT_TOKEN: [SOT_TOKEN], EOT_TOKEN: [EOT_TOKEN]}
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """The ids of `text` without the start / end tokens."""
        ids: list[int] = []
        for piece in _PATTERN.findall(_clean(text)):
            word = piece if piece in (SOT_TOKEN, EOT_TOKEN) else "".join(self.byte_to_symbol[b] for b in piece.encode())
            ids.extend(self.encoder[s] for s in self._bpe(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: start tokens dropped, stopping at the first end token (so a padded row reads as its
        text); words are separated by spaces, as CLIP's decoder does."""
        symbols = []
        for i in (int(t) for t in ids):
            if i == self.eot_id:
                break
            if i != self.sot_id:
                symbols.append(self.decoder[i])
        data = bytes(self.symbol_to_byte[c] for c in "".join(symbols))  # "</w>" is plain ASCII here
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
        """LongTensor (N, context_length): start, ids, end, zero padding; too long a text is cut and its last
        kept token replaced by the end token (open_clip's truncation)."""
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """One shared tokenizer: reading the 49k merges takes a fraction of a second, worth doing once."""
    tok = ClipTokenizer()
    log.debug("loaded CLIP BPE vocabulary (%d tokens)", tok.vocab_size)
    return tok


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """`default_tokenizer()(texts, context_length)`: what open_clip's `tokenize` returns."""
    return default_tokenizer()(texts, context_length)
