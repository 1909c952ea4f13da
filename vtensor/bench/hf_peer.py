"""The HF ``transformers`` peer: ``generate`` with a static cache and sdpa, eager and
compiled.

* **eager** (``disable_compile=True``) runs in this process.
* **compiled** is transformers' documented fast path: ``generate`` with a static
  cache and compilation left on, which compiles the decode forward with its
  ``CompileConfig`` defaults (``torch.compile``, mode ``reduce-overhead``: CUDA
  graphs). transformers does this only on CUDA-like devices; elsewhere it runs
  eagerly, which is reported as such. Compiling an 8B model takes minutes, and a
  failed compile or capture can leave a process's CUDA context unusable, so the
  compiled path runs in a child process (``python -m vtensor.bench.hf_peer JOB``)
  under a time limit; a timeout or an error is recorded, not raised.

Both paths reuse one ``StaticCache`` per model (reset before each call): a fresh
cache per ``generate`` would give the compiled graph new cache addresses on every
call (a CUDA-graph re-record inside the timed window).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import torch

from vtensor.engine.setup import EngineRuntime
from vtensor.models.config import ModelConfig

RESULT = "RESULT "  # prefix of the child's one line of JSON on stdout


def hf_spec(cfg: ModelConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that shape an HF model (plain JSON, for the child process)."""
    names = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
             "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings",
             "rms_norm_eps", "tie_word_embeddings")  # fmt: skip
    return {n: getattr(cfg, n) for n in names}


def hf_model(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """A random-weight HF model of the spec's shape (values do not matter for timing)."""
    import transformers

    # Keyword arguments for either config class; Any because a dict's value type is
    # one for all keys, and each constructor parameter has its own.
    common: dict[str, Any] = dict(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        rms_norm_eps=spec["rms_norm_eps"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        attn_implementation="sdpa",
    )
    hf_cfg: transformers.PretrainedConfig
    if spec["architecture"] == "Qwen2ForCausalLM":
        hf_cfg = transformers.Qwen2Config(**common)
    else:
        hf_cfg = transformers.LlamaConfig(head_dim=spec["head_dim"], **common)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@torch.inference_mode()
def hf_decode_step_s(
    spec: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    shape: tuple[int, int, int],
    compiled: bool,
) -> dict[str, Any]:
    """Seconds per decode step, (generate 1+steps tokens − generate 1) / steps, after a
    warm-up (the compile, for the compiled path) that is timed apart."""
    from transformers import StaticCache

    batch, ctx, steps = shape
    model = hf_model(spec, device, dtype)
    cache = StaticCache(config=model.config, max_cache_len=ctx + 1 + steps)
    ids = torch.randint(0, spec["vocab_size"], (batch, ctx), device=device)
    t0 = time.perf_counter()
    # Compiled: the compile and the CUDA-graph recording happen in these calls.
    for new in (1 + steps, 1 + steps, 1) if compiled else (1, 1 + steps):
        _generate(model, ids, new, cache, compiled)
    warmup_s = time.perf_counter() - t0
    graphs = _compiled_graphs()
    prefill = min(_generate(model, ids, 1, cache, compiled) for _ in range(2))
    total = min(_generate(model, ids, 1 + steps, cache, compiled) for _ in range(2))
    return {
        "step_s": (total - prefill) / steps,
        "warmup_s": warmup_s,
        "compiled": hasattr(model, "_compiled_call"),  # set by transformers' get_compiled_call
        "recompiles_while_timed": _compiled_graphs() - graphs,
    }


def hf_eager_step_or_none(
    cfg: ModelConfig, rt: EngineRuntime, batch: int, ctx: int, steps: int
) -> float | None:
    """Eager HF in this process; None when it runs out of memory (it prefills the whole
    batch at once)."""
    try:
        shape = (batch, ctx, steps)
        return hf_decode_step_s(hf_spec(cfg), rt.device, rt.dtype, shape, False)["step_s"]
    except torch.OutOfMemoryError as exc:
        print(f"  HF eager out of memory at batch {batch}: {str(exc).splitlines()[0]}")
        return None
    finally:
        gc.collect()  # the model and its static cache
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()


def hf_compiled(
    cfg: ModelConfig, rt: EngineRuntime, batch: int, ctx: int, steps: int, timeout_s: float
) -> dict[str, Any]:
    """Compiled HF in a child process, killed after ``timeout_s``. Returns a record with
    ``status`` ("ok", "timeout", "error", "out of memory", "not compiled")."""
    job = {
        "spec": hf_spec(cfg),
        "device": str(rt.device),
        "dtype": str(rt.dtype).removeprefix("torch."),
        "shape": [batch, ctx, steps],
    }
    cmd = [sys.executable, "-m", "vtensor.bench.hf_peer", json.dumps(job)]
    # A session of its own, so that a timeout also ends inductor's compile workers.
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"status": "timeout", "detail": f"no result within {timeout_s:g} s"}
    return _child_result(out, err, child.returncode)


def _child_result(out: str, err: str, code: int) -> dict[str, Any]:
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT)]
    if code == 0 and lines:
        return json.loads(lines[-1][len(RESULT) :])
    tail = [ln for ln in err.splitlines() if ln.strip()][-1:] or [f"exit code {code}"]
    return {"status": "error", "detail": tail[0][:300]}


def _generate(model: Any, ids: torch.Tensor, new: int, cache: Any, compiled: bool) -> float:
    """Wall seconds of one ``generate`` of exactly ``new`` tokens."""
    cache.reset()
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        past_key_values=cache,
        disable_compile=not compiled,
        pad_token_id=0,
    )
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (to see recompiles in a timed run)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - a private counter: informational only
        return -1


def _child_main(job: dict[str, Any]) -> dict[str, Any]:
    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    try:
        res = hf_decode_step_s(job["spec"], device, dtype, tuple(job["shape"]), True)
    except torch.OutOfMemoryError as exc:
        return {"status": "out of memory", "detail": str(exc).splitlines()[0][:300]}
    if not res["compiled"]:
        detail = "transformers ran the forward eagerly (it compiles only on CUDA-like devices)"
        return {"status": "not compiled", "detail": detail, **res}
    return {"status": "ok", **res}


if __name__ == "__main__":
    print(RESULT + json.dumps(_child_main(json.loads(sys.argv[1]))), flush=True)
