"""OutputProcessor on fixed token ids (no model): stop strings in text that the
incremental detokenizer holds back until the request ends.

The embedded byte-level tokenizer has single-byte tokens that are not valid
UTF-8 on their own (random weights emit them), so decoded text can end in
U+FFFD at every step. The detokenizer waits while it does (the next byte may
complete the character), and only the final flush releases that text.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import pytest

from vtensor import SamplingParams
from vtensor.engine.output_processor import OutputProcessor
from vtensor.engine.request import Request
from vtensor.models.embedded import embedded_tokenizer

K, LEAD = 46, 138  # "K"; byte 0xCA, a two-byte lead: "\xca\xca..." decodes to U+FFFD each
PROMPT = (10, 11, 12)
FFFD = "\ufffd"


def run(ids: Seq[int], params: SamplingParams, eos: tuple[int, ...] = ()) -> tuple[Request, str]:
    """Feed ``ids`` one per step as the engine does; the request and its output text,
    which must equal the text streamed step by step."""
    out = OutputProcessor(embedded_tokenizer(), eos)
    seq = Request.new(0, PROMPT, params, max_len=len(PROMPT) + len(ids), arrival=0.0)
    out.add(seq.rid, PROMPT, params, stream=True)
    seq.admit()
    streamed = ""
    for token in ids:  # the engine's order: launch (advance), read (append), check, finish
        seq.advance(len(seq.token_ids), sampled=True)
        seq.append_output(len(seq.token_ids), token, None, now=0.0)
        decision = out.on_token(seq)
        if decision is not None:
            seq.finish(decision.reason, decision.stop_reason)
        streamed += out.output(seq, token, None).new_text
        if seq.finished:
            break
    text = out.text_of(seq)
    assert streamed == text
    return seq, text


def test_text_held_back_to_the_end_is_all_released() -> None:
    assert embedded_tokenizer().decode([K, LEAD, LEAD, LEAD]) == "K" + 3 * FFFD
    seq, text = run([K] + [LEAD] * 9, SamplingParams(max_tokens=10, stop=[FFFD + "K"]))
    assert (seq.finish_reason, text) == ("length", "K" + 9 * FFFD)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_in_text_released_only_at_the_end_still_stops(include: bool) -> None:
    """A failing case of tests/test_server.py::test_stop_string_is_cut_in_both_modes: the
    prompt "fast memory the a fast memory page a" gives greedy "K" then 0xCA bytes, and
    stop = text[3:6]. No text was released before the final flush, so the stop string was
    never checked and the request ended on length with the stop string in its text."""
    stop = 3 * FFFD
    params = SamplingParams(max_tokens=30, stop=[stop], include_stop_str_in_output=include)
    seq, text = run([K] + [LEAD] * 29, params)
    assert (seq.finish_reason, seq.stop_reason) == ("stop", stop)
    assert text == ("K" + stop if include else "K")


def test_eos_with_held_back_text_prefers_the_earlier_stop_string() -> None:
    """EOS ends the request; a stop string in the text flushed then comes first in the text."""
    eos = 1
    params = SamplingParams(max_tokens=30, stop=[2 * FFFD])
    seq, text = run([K, LEAD, LEAD, LEAD, eos], params, eos=(eos,))
    assert (seq.finish_reason, seq.stop_reason, text) == ("stop", 2 * FFFD, "K")
