"""Serving workloads (NOTES §5) as synthetic token ids: nothing is downloaded.

Each workload is a list of ``Conversation``s. Single-shot workloads have one
turn each; the multi-turn workload has several, and the client builds each
turn's prompt from the previous prompt, the answer, and the next question.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .datasets import random_dataset

DATASETS = ("random", "sharegpt-like", "multiturn", "shared-prefix")


@dataclass(frozen=True)
class Conversation:
    """``turns[i]`` is the i-th user message (token ids) and ``output_lens[i]`` its answer."""

    turns: list[list[int]]
    output_lens: list[int]

    def __post_init__(self) -> None:
        if not self.turns or len(self.turns) != len(self.output_lens):
            raise ValueError("a conversation needs one output length per turn, and a turn")


@dataclass(frozen=True)
class WorkloadArgs:
    dataset: str
    num_prompts: int
    vocab_size: int
    input_len: int = 1024  # random
    output_len: int = 128  # random
    range_ratio: float = 0.0  # random
    num_clients: int = 256  # multiturn
    num_rounds: int = 5  # multiturn
    question_len: int = 512  # multiturn
    answer_len: int = 64  # multiturn
    num_groups: int = 64  # shared-prefix
    prompts_per_group: int = 16  # shared-prefix
    system_len: int = 2048  # shared-prefix
    sp_question_len: int = 128  # shared-prefix
    sp_output_len: int = 256  # shared-prefix
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {DATASETS}")
        if self.vocab_size < 16:
            raise ValueError("vocab_size must be >= 16")


def build_workload(a: WorkloadArgs) -> list[Conversation]:
    rng = random.Random(a.seed)
    if a.dataset == "random":
        reqs = random_dataset(
            a.num_prompts, a.input_len, a.output_len, a.vocab_size, a.range_ratio, a.seed
        )
        return [Conversation([r.prompt_ids], [r.output_len]) for r in reqs]
    if a.dataset == "sharegpt-like":
        return [_sharegpt_like(rng, a.vocab_size) for _ in range(a.num_prompts)]
    if a.dataset == "multiturn":
        return [
            Conversation(
                [_ids(rng, a.question_len, a.vocab_size) for _ in range(a.num_rounds)],
                [a.answer_len] * a.num_rounds,
            )
            for _ in range(a.num_clients)
        ]
    return _shared_prefix(rng, a)


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Ids from the lower part of the vocabulary: the top is often special tokens.
    return [rng.randrange(vocab - min(vocab // 8, 1024)) for _ in range(n)]


def _sharegpt_like(rng: random.Random, vocab: int) -> Conversation:
    """Long-tailed lengths like ShareGPT's: prompt 4..1024 (mean ~220), output >= 4 (mean
    ~200), prompt + output <= 2048. Log-normal with sigma 1, clipped."""
    sigma = 1.0
    prompt = _lognormal(rng, 220, sigma, 4, 1024)
    output = _lognormal(rng, 200, sigma, 4, 2048 - prompt)
    return Conversation([_ids(rng, prompt, vocab)], [output])


def _lognormal(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - sigma**2 / 2  # so that the unclipped mean is ``mean``
    return max(lo, min(hi, round(rng.lognormvariate(mu, sigma))))


def _shared_prefix(rng: random.Random, a: WorkloadArgs) -> list[Conversation]:
    """SGLang's generated-shared-prefix: groups of prompts sharing one system prompt."""
    out = []
    for _ in range(a.num_groups):
        system = _ids(rng, a.system_len, a.vocab_size)
        for _ in range(a.prompts_per_group):
            prompt = system + _ids(rng, a.sp_question_len, a.vocab_size)
            out.append(Conversation([prompt], [a.sp_output_len]))
    rng.shuffle(out)
    return out
