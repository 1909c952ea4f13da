"""Mapping ahead of need: the chunks the next step will take, mapped in this one.

Torch-free pure functions of the KV manager and the scheduler's queues, called by
``Scheduler.schedule`` after the step is planned, so that the mapper works while
the GPU computes. Both map from free chunks only (never preempting) and may
evict unlocked cache blocks first; their commands go out as the step's
``ahead_commands``.

* **map-ahead** (``map_ahead``): running requests' slots grow to what their next
  steps will write (``lookahead_tokens`` when decoding, the next span when
  prefilling);
* **premap** (``premap_waiting``): the idle slots that the next step's admissions
  will take are mapped for the head of the waiting queue.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from vtensor.kvcache.manager import KVCacheManager
from vtensor.kvcache.prefix_cache import PrefixMatch

from .request import Request
from .scheduler_output import ScheduledSpan


def map_ahead(kv: KVCacheManager, spans: Iterable[ScheduledSpan], lookahead_tokens: int) -> None:
    """Map what the next steps will write (never preempts). A pool the cache has
    filled gives those chunks by eviction: done now, while the GPU computes, so the
    step that writes them does not evict and remap (the same blocks would go then:
    least recently used first)."""
    geo = kv.geometry
    targets = []
    for sp in spans:
        remaining = sp.req.num_tokens - sp.end
        target = sp.end + (min(remaining, sp.num_tokens) if remaining else lookahead_tokens)
        targets.append((sp.req.rid, min(target, sp.req.max_len)))
    need = sum(max(0, geo.chunks_for(t) - kv.mapped_chunks(r)) for r, t in targets)
    kv.evict_to_free(need)
    for rid, target in targets:
        kv.grow(rid, target, steal=False)


def premap_waiting(
    kv: KVCacheManager,
    waiting: Iterable[Request],
    num_running: int,
    max_num_seqs: int,
    token_budget: int,
) -> None:
    """Map, during this step, the slots that the next step's admissions will take
    (``waiting``'s head, within one step's ``token_budget``): a prompt's chunks are
    otherwise mapped in the very step that needs them. ``num_running`` requests keep
    a chunk each of headroom, as admission does."""
    # Every idle slot, not only the free seats: with every seat taken, the spare
    # slots (``engine/kv_setup.spare_slots``) are mapped ahead for those next in line.
    seats = max(max_num_seqs - num_running, len(kv.slots.idle_slots()))
    heads = list(itertools.islice(waiting, max(0, seats)))
    wanted, hits = _next_admissions(kv, heads, token_budget)
    if not wanted:
        return
    geo = kv.geometry
    fresh = sum(max(0, geo.chunks_for(t) - len(h.chunks)) for t, h in zip(wanted, hits))
    kv.evict_to_free(num_running + fresh, keep=hits)
    kv.premap(wanted, headroom_chunks=num_running, hits=hits)


def _next_admissions(
    kv: KVCacheManager, heads: list[Request], budget: int
) -> tuple[list[int], list[PrefixMatch]]:
    """The tokens each of ``heads`` would map if admitted next step (within one
    step's token ``budget``), and its cache hit now."""
    wanted: list[int] = []
    hits: list[PrefixMatch] = []
    for req in heads:
        if budget <= 0:
            break
        hit = kv.match(req.token_ids, req.num_tokens - 1)
        n = min(req.num_tokens - hit.tokens, budget)  # computed from the end of the hit
        wanted.append(hit.tokens + n)
        hits.append(hit)
        budget -= n
    return wanted, hits
