"""Shared by the GPU tests of the host KV tier (``test_swap_gpu``, ``test_spill_gpu``,
``test_slo_gpu``) and of the prefix cache (``test_prefix_gpu``): the model they run,
and delays on the copy and compute streams that expose a missing wait.

Importable without a GPU (the delays touch CUDA only when called)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

# 8 layers x 8 KV heads x 64 dims x K,V: 32 KiB per token in fp32 (64 tokens per 2 MiB
# chunk), 16 KiB in bf16.
OVER = dict(num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
            hidden_size=512, head_dim=64, max_position_embeddings=2048)  # fmt: skip
CHUNK = 2 << 20


def spin_cycles_for(seconds: float) -> int:
    """The ``torch.cuda._sleep`` cycles that take about ``seconds`` on this GPU."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return int(cycles * seconds / (start.elapsed_time(end) / 1e3))


def slow_copy(cycles: int) -> Any:
    """A ``copy_bytes`` (``engine/swap.py``) whose every copy lands ``cycles`` late."""

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        torch.cuda._sleep(cycles)  # on the copy stream: the copy lands this much later
        dst.copy_(src, non_blocking=True)

    return copy


def slow_forward(runner: Any, cycles: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every forward pass of ``runner`` ``cycles`` late on the compute stream."""
    execute = runner.execute

    def late_execute(spans: Any) -> Any:
        torch.cuda._sleep(cycles)  # on the compute stream, before the step's kernels
        return execute(spans)

    monkeypatch.setattr(runner, "execute", late_execute)
