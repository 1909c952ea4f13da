"""The decode table of ``vtensor bench offline``: decode steps of a constant batch,
timed against the physical floor.

A timed window means something only if the batch it times is the batch the floor
counts. So each window

* gives every request room for its admission, the warm-up and the window itself
  (``max_tokens`` runs to ``max_model_len``; the requests are aborted afterwards),
* records, after every timed step, how many requests run and wait (two list
  lengths: nothing that costs time inside the loop), and raises
  :class:`BatchChangedError` unless exactly ``batch`` ran and none waited on every
  step and every request advanced exactly one token per step,
* counts the KV bytes read from the requests' real context lengths at the start of
  the window plus one token per step, not from the nominal ``--decode-ctx``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams

from .report import format_table

GOAL_X_FLOOR = 1.2  # issue 11: an async decode step within 1.2x the floor at every batch


class BatchChangedError(RuntimeError):
    """The batch of a timed decode window was not the batch the floor counts."""


@dataclass(frozen=True)
class DecodeWindow:
    """One timed window of decode steps, after its constant-batch checks passed."""

    batch: int
    steps: int
    start_cached: tuple[int, ...]  # each request's cached tokens when the window opened
    seconds: float

    @property
    def kv_rows_per_step(self) -> float:
        """Mean KV rows (tokens, all layers, K and V) a step reads.

        A decode step over a request with ``c`` cached tokens stores token ``c`` and
        reads ``c + 1`` rows; with the batch constant, request ``r`` reads
        ``c_r + 1 + k`` rows in the window's step ``k``.
        """
        first = sum(c + 1 for c in self.start_cached)
        growth = self.batch * self.steps * (self.steps - 1) // 2
        return (first * self.steps + growth) / self.steps


def kv_bytes_per_token(engine: LLMEngine) -> int:
    """K and V of every layer for one token, as this GPU's arena stores them (its KV
    heads only, under tensor parallelism)."""
    return engine.arena.layout.bytes_per_token


def weight_bytes_read(engine: LLMEngine) -> int:
    """Weight bytes a decode step reads on this GPU: every parameter of its shard but an
    untied embedding table, of which it gathers one row per request."""
    model = engine.model
    params = sum(p.numel() for p in model.parameters())  # a tied table once
    if not model.config.tie_word_embeddings:
        params -= model.model.embed_tokens.weight.numel()
    return params * engine.runtime.dtype.itemsize


def decode_steps(engine: LLMEngine, batch: int, ctx: int, steps: int) -> dict[str, Any]:
    """Mean time of ``steps`` decode steps of exactly ``batch`` requests of prompt ``ctx``."""
    if engine.has_unfinished():
        raise RuntimeError("decode_steps needs an idle engine: its batch must be only its own")
    if batch > engine.config.max_num_seqs:
        raise ValueError(f"decode batch {batch} exceeds max_num_seqs={engine.config.max_num_seqs}")
    vocab, limit = engine.model_config.vocab_size, engine.runtime.max_model_len
    if ctx + steps + 2 > limit:
        raise ValueError(
            f"--decode-ctx {ctx} + --decode-steps {steps} exceed max_model_len {limit}"
        )
    # Room to the end of the context: admission and warm-up take a number of steps that
    # grows with the batch (about 34 at batch 256), and no request may end in the window.
    params = SamplingParams(max_tokens=limit - ctx, ignore_eos=True, temperature=0)
    prompts = [[(i * 7 + j) % vocab for j in range(ctx)] for i in range(batch)]
    rids = [rid for group in engine.add_requests(prompts, params) for rid in group]
    try:
        warmup = _fill_batch(engine, set(rids), ctx)
        s0 = engine.stats()
        window = _timed_window(engine, batch, steps)
        s1 = engine.stats()
    finally:
        for r in rids:
            engine.abort(r)
            engine.pop(r)
    # Bytes a step must move on one GPU: the weights it reads (not an untied embedding
    # table, of which it gathers one row per request) and the KV the batch really holds;
    # under tensor parallelism each GPU's shard and KV heads, read in parallel.
    return {
        "batch": batch,
        "ctx": ctx,
        "tp": engine.group.size,
        "step_ms": window.seconds / steps * 1e3,
        "weight_bytes": weight_bytes_read(engine),
        "kv_bytes_read": window.kv_rows_per_step * kv_bytes_per_token(engine),
        "ctx_at_window_start_mean": sum(window.start_cached) / batch,
        "running_every_step": batch,  # checked on every timed step
        "warmup_steps": warmup,
        "mapper_wait_ms": (s1.mapper_wait_s - s0.mapper_wait_s) * 1e3,
    }


def _fill_batch(engine: LLMEngine, rids: set[int], ctx: int) -> int:
    """Step until every request runs with its prompt cached and one decode launched;
    returns the steps taken. Bounded, so that a batch that cannot form fails loudly."""
    sched = engine.scheduler
    budget = engine.config.max_num_batched_tokens
    bound = 4 * (len(rids) * (ctx + 1) // budget + len(rids)) + 64
    for n in range(1, bound + 1):
        engine.step()
        ours = [s for s in sched.running if s.rid in rids]
        if not sched.waiting and len(ours) == len(rids) and all(s.num_computed > ctx for s in ours):
            return n
    raise BatchChangedError(
        f"batch {len(rids)} did not form in {bound} steps ({len(sched.running)} running, "
        f"{len(sched.waiting)} waiting): is the KV pool too small for it?"
    )


def _timed_window(engine: LLMEngine, batch: int, steps: int) -> DecodeWindow:
    sched = engine.scheduler
    seqs = list(sched.running)
    start = tuple(s.num_computed for s in seqs)
    room = min(s.max_len - s.num_tokens for s in seqs)
    if room < steps + 1:
        raise ValueError(
            f"only {room} tokens left per request for a {steps}-step window: lower "
            "--decode-ctx or --decode-steps, or raise --max-model-len"
        )
    running, waiting = [0] * steps, [0] * steps
    _synchronize(engine)  # the warm-up's last step is not the window's
    t0 = time.perf_counter()
    for i in range(steps):
        engine.step()
        running[i], waiting[i] = len(sched.running), len(sched.waiting)
    _synchronize(engine)  # async scheduling leaves the last step running: count it
    seconds = time.perf_counter() - t0
    for i, (r, w) in enumerate(zip(running, waiting)):
        if r != batch or w:
            raise BatchChangedError(
                f"decode batch {batch}: timed step {i} ran {r} requests with {w} waiting"
            )
    for s, c in zip(seqs, start):
        if s.num_computed - c != steps:
            raise BatchChangedError(
                f"decode batch {batch}: request {s.rid} advanced {s.num_computed - c} "
                f"tokens in {steps} steps"
            )
    return DecodeWindow(batch, steps, start, seconds)


def _synchronize(engine: LLMEngine) -> None:
    if engine.runtime.device.type == "cuda":
        torch.cuda.synchronize()


def run_decode_table(
    engine: LLMEngine, batches: list[int], ctx: int, steps: int, sync: bool = True
) -> list[dict]:
    """Each batch synchronously (unless ``sync`` is off), then with async scheduling, on
    the same engine."""
    rows = []
    for b in batches:
        print(f"decode: batch {b}, context {ctx}", flush=True)
        synced = None
        if sync:
            engine.set_async_scheduling(False)
            synced = decode_steps(engine, b, ctx, steps)
        engine.set_async_scheduling(True)
        row = decode_steps(engine, b, ctx, steps)
        row["sync_step_ms"] = synced["step_ms"] if synced else None
        row["sync_kv_bytes_read"] = synced["kv_bytes_read"] if synced else None
        rows.append(row)
    return rows


def add_floor(rows: list[dict], bandwidth: float | None) -> dict[str, Any]:
    """Add the floor and ratios to each row; return the goal's verdict."""
    for d in rows:
        moved = d["weight_bytes"] + d["kv_bytes_read"]
        d["floor_ms"] = moved / (bandwidth * 1e9) * 1e3 if bandwidth else None
        d["x_floor"] = d["step_ms"] / d["floor_ms"] if d["floor_ms"] else None
        d["x_sync"] = d["sync_step_ms"] / d["step_ms"] if d["sync_step_ms"] else None
        for peer in ("eager", "compiled"):
            hf = d.get(f"hf_{peer}_step_ms")
            d[f"x_hf_{peer}"] = hf / d["step_ms"] if hf else None
    goal: dict[str, Any] = {"goal_x_floor": GOAL_X_FLOOR, "batches": [d["batch"] for d in rows]}
    goal.update(met=None, worst_x_floor=None, worst_batch=None)
    ratios = [(d["x_floor"], d["batch"]) for d in rows if d["x_floor"] is not None]
    if ratios and len(ratios) == len(rows):  # a verdict only when every batch has a floor
        worst = max(ratios)
        goal.update(met=worst[0] <= GOAL_X_FLOOR, worst_x_floor=worst[0], worst_batch=worst[1])
    return goal


def print_decode(rows: list[dict], goal: dict[str, Any], bandwidth: float | None) -> None:
    """The decode table, the HF compiled path's status where it has no time, the goal."""
    print(
        f"decode step (async scheduling) vs floor (weights + KV really read by one GPU, "
        f"at {bandwidth or 0:.0f} GB/s), vs synchronous steps, vs HF eager and HF compiled:"
    )
    headers = ["batch", "running", "ctx (mean)", "KV MB/step", "step ms", "floor ms",
               "x floor", "sync ms", "x sync", "HF eager ms", "x HF eager",
               "HF compiled ms", "x HF compiled"]  # fmt: skip
    table = [
        (d["batch"], d["running_every_step"], d["ctx_at_window_start_mean"],
         d["kv_bytes_read"] / 1e6, d["step_ms"], _or_dash(d["floor_ms"]),
         _or_dash(d["x_floor"]), _or_dash(d["sync_step_ms"]), _or_dash(d["x_sync"]),
         _or_dash(d.get("hf_eager_step_ms")), _or_dash(d["x_hf_eager"]),
         _or_dash(d.get("hf_compiled_step_ms")), _or_dash(d["x_hf_compiled"]))
        for d in rows
    ]  # fmt: skip
    print(format_table(headers, table))
    print(
        "  running: requests in every timed step (checked); ctx (mean): cached tokens per "
        "request when the window opened;\n  KV MB/step: KV read per step from those "
        "contexts, as the floor counts it"
    )
    for d in rows:
        hf = d.get("hf_compiled")
        if hf and hf.get("status") != "ok":
            print(f"  HF compiled, batch {d['batch']}: {hf['status']}: {hf.get('detail', '')}")
    print(goal_line(goal))


def goal_line(goal: dict[str, Any]) -> str:
    batches = "/".join(str(b) for b in goal["batches"])
    head = f"goal: async decode step <= {goal['goal_x_floor']}x the floor at batch {batches}: "
    if goal["met"] is None:
        return head + "not measured (no read bandwidth: the floor needs a GPU)"
    verdict = "MET" if goal["met"] else "NOT MET"
    return head + f"{verdict} (worst {goal['worst_x_floor']:.2f}x, at batch {goal['worst_batch']})"


def _or_dash(value: float | None) -> float | str:
    return "-" if value is None else value
