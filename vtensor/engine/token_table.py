"""TokenTable: each KV slot's last sampled token, on the device (mini-sglang's token_pool).

Every step writes its sampled tokens here, at the slots of the requests that
sampled, right after the draw. A later step whose input is a token the host
has not read yet (async scheduling: it was sampled by the step still in
flight) gathers it from here by the request's slot, so the host never needs
the token to launch the next step and no stand-in id lives in the request.

Why a slot holds the right token: a request keeps its slot from admission to
its end (a preempted request recomputes from token 0, so its next span that
samples rewrites its new slot before any step reads it), and every read and
write is queued on one stream, so a read sees the last write queued before
it. The table's address never changes, so CUDA graphs capture reads from it.
"""

from __future__ import annotations

import torch


class TokenTable:
    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.tokens = torch.zeros(num_slots, dtype=torch.long, device=device)

    def write(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """``tokens[i]`` is the token just sampled by the request in ``slots[i]``."""
        self.tokens.index_copy_(0, slots, tokens)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """The last token sampled in each of ``slots`` (a device-side gather: no sync)."""
        return self.tokens.index_select(0, slots)
