"""``LLM``: offline batched generation, vLLM's API.

from vtensor import LLM, SamplingParams
llm = LLM()                                   # embedded tiny random model
outs = llm.generate(["Hello"], SamplingParams(max_tokens=8))
print(outs[0].outputs[0].text)
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm import tqdm

from .config import EngineConfig
from .input_processor import Prompt
from .llm_engine import LLMEngine
from .memory_stats import MemoryStats
from .outputs import CompletionOutput, RequestOutput
from .params import SamplingParams
from .shared_pool import SharedKVPool


class LLM:
    def __init__(
        self, model: str | None = None, kv_pool: SharedKVPool | None = None, **kwargs: Any
    ) -> None:
        """``kwargs`` are :class:`EngineConfig` fields (device, dtype, max_model_len, ...).
        ``kv_pool``: a :class:`SharedKVPool` whose one KV budget this model shares with
        the other ``LLM`` objects built on it (several models on one GPU)."""
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs), kv_pool=kv_pool)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order.

        Every prompt is checked against the engine's request contract before any is
        queued, so a bad one raises ``ValueError`` (``RequestError``) and nothing runs.
        """
        plist = _as_prompt_list(prompts)
        groups = self.engine.add_requests(plist, _as_params(sampling_params))
        self._run(sum(len(g) for g in groups), use_tqdm)
        return [self._output(i, p, g) for i, (p, g) in enumerate(zip(plist, groups))]

    def chat(
        self,
        messages: Seq[dict[str, Any]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([prompt], sampling_params, use_tqdm)

    def memory_stats(self) -> MemoryStats:
        """The bytes the engine holds: KV by class (live, prefix-cached, idle, free in
        the pool, scratch), weights and workspace (``engine/memory_stats.py``)."""
        return self.engine.memory_stats()

    def reclaim_idle(self) -> int:
        """Apply bounded deferred reclamation now (``LLMEngine.reclaim_idle``): an offline
        ``LLM`` runs no step between calls, so idle time is checked at the next call or
        here. Returns the chunks freed."""
        return self.engine.reclaim_idle()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix, so that all KV chunks go back to the pool (vLLM's
        API). Returns False, changing nothing, while requests are running."""
        return self.engine.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode (needs ``enable_sleep_mode=True``): drop all KV and give
        the weights' memory back, level 1 keeping a copy in pinned host memory, level
        2 none (``wake_up`` reloads the checkpoint; a random-weights model re-draws
        its seed's weights). Raises ``EngineBusyError`` with requests unfinished,
        ``EngineSleepingError`` when already asleep; either changes nothing."""
        self.engine.sleep(level)

    def wake_up(self) -> None:
        """Map the weights back at the same addresses (CUDA graphs stay valid); KV
        returns on demand. Does nothing when awake."""
        self.engine.wake_up()

    @property
    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, total: int, use_tqdm: bool) -> None:
        with tqdm(total=total, desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                done = sum(1 for o in self.engine.step() if o.finished)
                bar.update(done)

    def _output(self, index: int, prompt: Prompt, rids: list[int]) -> RequestOutput:
        completions = []
        preemptions = 0
        prompt_ids: list[int] = []
        cached: list[int] = []
        for j, rid in enumerate(rids):
            text = self.engine.text_of(rid)
            req = self.engine.pop(rid)
            prompt_ids = list(req.prompt_ids)
            preemptions += req.num_preemptions
            cached.append(req.num_cached_tokens or 0)
            logprobs = req.logprobs if req.params.logprobs is not None else None
            completions.append(
                CompletionOutput(
                    j, text, req.output_ids, req.finish_reason, req.stop_reason, logprobs
                )
            )
        return RequestOutput(
            str(index),
            prompt if isinstance(prompt, str) else None,
            prompt_ids,
            completions,
            finished=True,
            num_preemptions=preemptions,
            num_cached_tokens=min(cached, default=0),
        )


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    ids = [t for t in items if isinstance(t, int)]
    if items and len(ids) == len(items):
        return [ids]  # a single token-id prompt
    if ids:  # a stray id among prompts: which prompt it belongs to cannot be known
        raise ValueError("prompts must be one list of token ids or a list of prompts, not a mix")
    return [p for p in items if not isinstance(p, int)]  # all of them (ids is empty)


def _as_params(
    params: SamplingParams | Seq[SamplingParams] | None,
) -> SamplingParams | list[SamplingParams]:
    if params is None:
        return SamplingParams()
    return params if isinstance(params, SamplingParams) else list(params)
