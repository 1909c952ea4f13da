"""OutputProcessor: sampled tokens in, stop decisions and streamable outputs out.

It owns each request's incremental detokenizer and how much of its text has
been handed out, so the engine's step loop only moves tokens (torch-free).
It reads requests and never writes them: the engine applies its decisions.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from vtensor.models.tokenizer import IncrementalDetokenizer, Tokenizer

from .outputs import StepOutput
from .params import SamplingParams
from .request import Request
from .stop import StopDecision, check_stop, cut_stop_string


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._detoks: dict[int, IncrementalDetokenizer] = {}
        self._streamed: dict[int, int] = {}  # characters of text handed out in StepOutputs

    def add(self, rid: int, prompt_ids: Seq[int], params: SamplingParams, stream: bool) -> None:
        """Detokenize ``rid`` as it goes if it has stop strings or streams text."""
        if self.tokenizer is not None and (params.stop or stream):
            self._detoks[rid] = IncrementalDetokenizer(self.tokenizer, list(prompt_ids[-4:]))

    def forget(self, rid: int) -> None:
        self._detoks.pop(rid, None)
        self._streamed.pop(rid, None)

    def on_token(self, req: Request) -> StopDecision | None:
        """Take in the token just read, ``req.token_ids[-1]``; whether it ends ``req``."""
        detok = self._detoks.get(req.rid)
        delta = detok.push([req.token_ids[-1]]) if detok is not None else ""
        decision = check_stop(req, self.eos_token_ids, detok, delta)
        if decision is not None and detok is not None and not isinstance(decision.stop_reason, str):
            # No stop string cut the text: it ends with this token, so the detokenizer
            # releases what it held back. It holds all new text while the text ends in
            # U+FFFD (the next byte may complete a character), so with invalid UTF-8 at
            # every step a stop string may only show up now. It still ends the text: the
            # output never contains a stop string, and it precedes any EOS or length stop.
            tail = detok.flush()
            decision = cut_stop_string(detok, tail, req.params) or decision
        return decision

    def output(self, req: Request, token: int, logprob: dict[int, float] | None) -> StepOutput:
        """The step's output for ``req`` (call after :meth:`on_token` and any finish)."""
        text = self._stream_delta(req, self._detoks.get(req.rid))
        return StepOutput(
            req.rid, [token], text, req.finished, req.finish_reason, req.stop_reason, logprob,
            req.num_cached_tokens or 0,
        )  # fmt: skip

    def text_of(self, req: Request) -> str:
        """The request's output text (stop strings already cut)."""
        if req.rid in self._detoks:
            return self._detoks[req.rid].text
        if self.tokenizer is None:
            return ""
        skip = req.params.skip_special_tokens
        return self.tokenizer.decode(req.output_ids, skip_special_tokens=skip)

    def _stream_delta(self, req: Request, detok: IncrementalDetokenizer | None) -> str:
        """New text safe to hand out. While running, the last ``len(longest stop) - 1``
        characters are held back: they may be the start of a stop string, which is cut
        from the output when it completes, and streamed text cannot be taken back."""
        if detok is None:
            return ""
        sent = self._streamed.get(req.rid, 0)
        hold = 0 if req.finished or not req.params.stop else max(map(len, req.params.stop)) - 1
        upto = max(sent, len(detok.text) - hold)
        self._streamed[req.rid] = upto
        return detok.text[sent:upto]
