"""How many bytes of text one token can cover: a bound that refuses long texts cheaply.

Tokenizing is linear but slow (a 10 MB text takes seconds), and a prompt with
``max_model_len`` tokens or more is refused anyway. If every token of a tokenizer
covers at most ``B`` UTF-8 bytes of the input text, a text of ``n`` bytes has at
least ``ceil(n / B)`` tokens, so its size alone proves it too long. That is the only
safe direction: bytes give a *lower* bound on tokens, never an upper one.

``B`` is computed once per tokenizer from its ``tokenizer.json``:

* the model's pieces: a token covers the text of its vocabulary string, whose UTF-8
  length is at least the input bytes it stands for (byte-level BPE maps each input byte
  to one character of 1 or 2 bytes; Metaspace's "▁" is 3 bytes for a 1-byte space; a
  byte-fallback token ``<0x41>`` is 6 characters for 1 byte). Added tokens cover their
  content. An unknown token, where it is not fused into runs, covers one character
  (at most 4 bytes);
* times the normalizer's most shrinking factor: canonical composition (NFC, NFKC)
  shrinks at most 3× (a Hangul syllable from 3 jamo, U+0390 from 3 code points; the
  composition pairs are frozen by Unicode's stability policy) after a decomposition
  that shrinks at most 4× (no character is over 4 bytes or maps to nothing); NFD,
  NFKD and Lowercase map each character to at least one character: at most 4×.

Anything else gets no bound (``bytes_per_token is None``), because a single token can
then cover unbounded text: WordPiece/WordLevel (one ``[UNK]`` per unknown word), fused
unknowns, pre-tokenizers or normalizers that drop text (Whitespace, Strip, a
``Removed`` split, regex replacements), added tokens that strip whitespace around
them, and truncation. ``tests/test_text_bound.py`` shows each of these breaking a
bound, and checks the bound against real tokenizers of every supported kind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

MAX_CHAR_BYTES = 4  # the longest UTF-8 character
COMPOSE = 3  # canonical composition's largest shrink (bytes before / after)


@dataclass(frozen=True)
class TextBound:
    """At most ``bytes_per_token`` bytes of input text per token; None: no bound."""

    bytes_per_token: int | None
    reason: str  # what the bound rests on, or why there is none

    def min_tokens(self, num_bytes: int) -> int:
        """The fewest tokens a text of ``num_bytes`` UTF-8 bytes can have."""
        if self.bytes_per_token is None:
            return 0
        return math.ceil(num_bytes / self.bytes_per_token)


class _NoBound(Exception):
    pass


def text_bound(tok: HFTokenizer) -> TextBound:
    """The bound of one HF tokenizer (reads its whole JSON: call it once)."""
    spec = json.loads(tok.to_str())
    try:
        if spec.get("truncation") is not None:
            raise _NoBound("the tokenizer truncates its input")
        piece = _model_bytes(spec["model"], tok)
        piece = max(piece, _added_bytes(spec.get("added_tokens") or []))
        _check_pre(spec.get("pre_tokenizer"))
        factor = _normalizer_factor(spec.get("normalizer"))
    except _NoBound as exc:
        return TextBound(None, str(exc))
    return TextBound(piece * factor, f"{piece} bytes per token x normalizer factor {factor}")


def _model_bytes(model: dict[str, Any], tok: HFTokenizer) -> int:
    kind = model.get("type")
    longest = max(len(t.encode()) for t in tok.get_vocab(with_added_tokens=False))
    if kind == "BPE":
        if model.get("unk_token") is not None and not model.get("byte_fallback"):
            if model.get("fuse_unk"):
                raise _NoBound("BPE fuses runs of unknown characters into one token")
            return max(longest, MAX_CHAR_BYTES)  # an unfused unknown is one character
        return longest
    if kind == "Unigram" and model.get("byte_fallback"):
        return longest  # unknown pieces fall back to bytes
    raise _NoBound(f"a {kind} model can cover unbounded text with one unknown token")


def _added_bytes(added: list[dict[str, Any]]) -> int:
    for token in added:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            raise _NoBound(f"added token {token.get('content')!r} absorbs the text around it")
    return max((len(str(t.get("content", "")).encode()) for t in added), default=0)


# Pre-tokenizers that split or map text but drop none of it (behaviours other than Removed).
_KEEPS_TEXT = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


def _check_pre(pre: dict[str, Any] | None) -> None:
    if pre is None:
        return
    kind = pre.get("type")
    if kind == "Sequence":
        for p in pre.get("pretokenizers") or []:
            _check_pre(p)
        return
    if kind not in _KEEPS_TEXT:
        raise _NoBound(f"the {kind} pre-tokenizer can drop text")
    if str(pre.get("behavior", "")).lower() == "removed":
        raise _NoBound(f"the {kind} pre-tokenizer removes what it matches")
    if kind == "Metaspace" and not pre.get("replacement"):
        raise _NoBound("Metaspace with an empty replacement drops spaces")


_FACTORS: dict[str, Callable[[dict[str, Any]], int]] = {
    "NFC": lambda _: COMPOSE * MAX_CHAR_BYTES,
    "NFKC": lambda _: COMPOSE * MAX_CHAR_BYTES,
    "NFD": lambda _: MAX_CHAR_BYTES,
    "NFKD": lambda _: MAX_CHAR_BYTES,
    "Lowercase": lambda _: MAX_CHAR_BYTES,
    "Prepend": lambda _: 1,  # only adds
    "ByteLevel": lambda _: 1,  # each byte becomes a character of 1 or 2 bytes
    "Replace": lambda n: _replace_factor(n),
}


def _normalizer_factor(norm: dict[str, Any] | None) -> int:
    if norm is None:
        return 1
    kind = norm.get("type")
    if kind == "Sequence":
        return math.prod(_normalizer_factor(n) for n in norm.get("normalizers") or [])
    if kind not in _FACTORS:
        raise _NoBound(f"the {kind} normalizer can shrink text without bound")
    return _FACTORS[kind](norm)


def _replace_factor(norm: dict[str, Any]) -> int:
    pattern = (norm.get("pattern") or {}).get("String")
    content = str(norm.get("content", ""))
    if pattern is None or len(content.encode()) < len(str(pattern).encode()) or not pattern:
        raise _NoBound("a Replace normalizer that can shrink text (a regex, or shorter content)")
    return 1
