"""The byte bound on token counts (``models/text_bound.py``) and the engine's cheap
rejection of texts that certainly exceed the context (issue 18).

The rule is only useful if it is safe: a text it refuses must really have too many
tokens. So every supported tokenizer kind is checked against its real ``encode`` on
arbitrary text and on text built from its longest tokens (where the bound is tightest),
and every configuration the rule refuses to bound is shown to break it.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers

from vtensor.engine.input_processor import InputProcessor, RequestError
from vtensor.kvcache.manager import KVGeometry
from vtensor.models.embedded import embedded_tokenizer
from vtensor.models.text_bound import text_bound
from vtensor.models.tokenizer import Tokenizer

CORPUS = [
    "Serving large language models is bound by GPU memory; the cache grows per token.",
    "The quick brown fox jumps over the lazy dog. Hello, world! 0 1 2 3 100 2026.",
    "================================================================ -------- ~~~~",
    "Ünïcödé têxt, ÅNGSTRÖM, ﬁne ligatures, Ａ fullwidth, 日本語のテキスト, 한국어 텍스트.",
    "    indented    code    with    spaces    and\ttabs\t\tand\n\nnewlines\n\n\n",
    "Κείμενο στα ελληνικά ΐ ᾂ, emoji 🙂🙂🙂 and symbols ∑∫√ ℃ K Ω Å.",
] * 8
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def _train(model: Any, *, normalizer: Any = None, pre: Any = None, byte_alphabet: bool = False,
           specials: tuple[str, ...] = ()) -> HFTokenizer:  # fmt: skip
    tok = HFTokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre is not None:
        tok.pre_tokenizer = pre
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_alphabet else []
    if isinstance(model, models.WordPiece):
        trainer: Any = trainers.WordPieceTrainer(
            vocab_size=300, special_tokens=list(specials), show_progress=False
        )
    else:
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(specials),
                                      initial_alphabet=alphabet, show_progress=False)  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _byte_level(normalizer: Any = None) -> HFTokenizer:
    return _train(models.BPE(), normalizer=normalizer,
                  pre=pre_tokenizers.ByteLevel(add_prefix_space=False), byte_alphabet=True,
                  specials=("<|bos|>", "<|im_start|>"))  # fmt: skip


def _fallback(**kw: Any) -> HFTokenizer:
    model = models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    return _train(model, specials=("<unk>", "<s>", *BYTE_TOKENS), **kw)


# Tokenizer kinds whose bound must hold: the embedded one, GPT-2/Llama-3 style byte-level
# BPE, Qwen-style NFC byte-level, SentencePiece-style (Metaspace, byte fallback), the older
# HF form of Llama-2 (Prepend + Replace normalizer), compatibility-lowercased text, and a
# BPE whose unknown characters become one unfused <unk> each.
BOUNDED = {
    "embedded": lambda: embedded_tokenizer()._tok,
    "byte-level": _byte_level,
    "nfc": lambda: _byte_level(normalizers.NFC()),
    "nfkc-lowercase": lambda: _byte_level(
        normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    ),
    "metaspace-fallback": lambda: _fallback(pre=pre_tokenizers.Metaspace()),
    "llama2-normalizer": lambda: _fallback(
        normalizer=normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    ),
    "unk-unfused": lambda: _train(
        models.BPE(unk_token="<unk>", fuse_unk=False),
        pre=pre_tokenizers.Metaspace(),
        specials=("<unk>",),
    ),
}
_BUILT: dict[str, HFTokenizer] = {}


def _tok(kind: str) -> HFTokenizer:
    if kind not in _BUILT:
        _BUILT[kind] = BOUNDED[kind]()
    return _BUILT[kind]


def _pieces(tok: HFTokenizer) -> list[str]:
    """The texts of the tokenizer's longest tokens, special ones included."""
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: -len(kv[0]))
    return [tok.decode([i], skip_special_tokens=False) for _, i in vocab[:40]]


TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)


@pytest.mark.parametrize("kind", list(BOUNDED))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_bound_never_exceeds_the_real_token_count(kind: str, data: st.DataObject) -> None:
    tok = _tok(kind)
    bound = text_bound(tok)
    assert bound.bytes_per_token is not None, bound.reason
    parts = data.draw(st.lists(st.one_of(TEXT, st.sampled_from(_pieces(tok))), max_size=12))
    text = "".join(parts) * data.draw(st.integers(1, 4))
    size = len(text.encode())
    for special in (False, True):
        n = len(tok.encode(text, add_special_tokens=special).ids)
        assert bound.min_tokens(size) <= n, f"{size} bytes gave {n} tokens; {bound}"


@pytest.mark.parametrize("kind", ["byte-level", "metaspace-fallback"])
def test_bound_is_reached_by_the_longest_token(kind: str) -> None:
    """Not vacuous: text made of the longest token meets the bound exactly."""
    tok = _tok(kind)
    bound = text_bound(tok)
    assert bound.bytes_per_token is not None
    longest = max(tok.get_vocab().items(), key=lambda kv: len(kv[0].encode()))
    text = tok.decode([longest[1]]) * random.randint(5, 50)
    n = len(tok.encode(text, add_special_tokens=False).ids)
    assert n <= 2 * bound.min_tokens(len(text.encode()))


def _word_piece() -> HFTokenizer:
    return _train(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100),
                  pre=pre_tokenizers.Whitespace(), specials=("[UNK]",))  # fmt: skip


def _lstrip() -> HFTokenizer:
    tok = _byte_level()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    return tok


def _truncating() -> HFTokenizer:
    tok = _byte_level()
    tok.enable_truncation(8)
    return tok


# Configurations with no bound, each with a text that breaks any bytes-per-token rule.
UNBOUNDED = {
    "word-piece": (_word_piece, "ζ" * 5000),  # one [UNK] for a whole unknown word
    "fused-unk": (
        lambda: _train(
            models.BPE(unk_token="<unk>", fuse_unk=True),
            pre=pre_tokenizers.Metaspace(),
            specials=("<unk>",),
        ),
        "ж" * 5000,  # one <unk> for the whole run of unknown characters
    ),
    "whitespace-split": (  # spaces are dropped: no tokens at all
        lambda: _train(models.BPE(), pre=pre_tokenizers.Whitespace()),
        " " * 5000,
    ),
    "strip": (
        lambda: _byte_level(normalizers.Strip()),
        " " * 5000 + "a",  # stripped before the model
    ),
    "lstrip-special": (_lstrip, " " * 5000 + "<mask>"),  # the token swallows the spaces
    "truncation": (_truncating, "hello world " * 500),
}


@pytest.mark.parametrize("kind", list(UNBOUNDED))
def test_no_bound_where_tokens_can_cover_unbounded_text(kind: str) -> None:
    make, text = UNBOUNDED[kind]
    tok = make()
    bound = text_bound(tok)
    assert bound.bytes_per_token is None and bound.reason
    # Why: this text has far fewer tokens than any fixed bytes-per-token rule allows.
    n = len(tok.encode(text, add_special_tokens=False).ids)
    assert n < len(text.encode()) / 100


# ------------------------------------------------ the engine's cheap rejection
def _processor(tokenizer: Tokenizer, max_model_len: int) -> InputProcessor:
    geo = KVGeometry(num_slots=4, max_tokens=4096, bytes_per_token=512, chunk_size=2**21,
                     capacity_chunks=64)  # fmt: skip
    return InputProcessor(tokenizer, tokenizer.vocab_size, max_model_len, geo)


def test_text_certainly_over_the_context_is_refused_before_tokenizing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tok = Tokenizer(_tok("byte-level"))
    limit = random.randint(16, 512)
    proc = _processor(tok, limit)
    per = tok.text_bound.bytes_per_token
    assert per is not None
    calls: list[str] = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda t, **kw: calls.append(t) or encode(t, **kw))
    # The rule: a prompt needs < max_model_len tokens, and N tokens cover at most N * per
    # bytes, so more than (max_model_len - 1) * per bytes is certainly too long.
    over = "a" * ((limit - 1) * per + 1)
    with pytest.raises(RequestError) as err:
        proc.encode(over)
    assert err.value.param == "prompt" and str(limit) in str(err.value)
    assert not calls, "the text was tokenized before it was refused"
    at_limit = "a" * ((limit - 1) * per)
    with pytest.raises(RequestError):  # too long too, but only tokenizing can tell
        proc.process(at_limit, _params())
    assert calls == [at_limit]


def _params() -> Any:
    from vtensor.engine.params import SamplingParams

    return SamplingParams(max_tokens=1)


def test_engine_refuses_text_that_is_not_unicode() -> None:
    proc = _processor(Tokenizer(_tok("byte-level")), 64)
    with pytest.raises(RequestError) as err:
        proc.encode("fine \ud800 not")
    assert err.value.param == "prompt" and "Unicode" in str(err.value)
