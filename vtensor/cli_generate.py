"""``vtensor generate``: print completions for prompts (the README's main command)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vtensor.engine.config import ATTENTION_BACKENDS

DEFAULT_PROMPTS = ["Hello, my name is", "The capital of France is"]


def add_engine_args(p: argparse.ArgumentParser, several_models: bool = False) -> None:
    """Engine options shared by ``generate`` and ``bench offline`` (and ``serve``, whose
    ``--model`` may be repeated: ``several_models``)."""
    if several_models:
        p.add_argument("--model", action="append", default=None,
                       help="HF checkpoint directory (default: embedded); repeat it to serve "
                            "several models from one shared KV budget")  # fmt: skip
    else:
        p.add_argument("--model", default=None, help="HF checkpoint directory (default: embedded)")
    p.add_argument("--shape", default=None, help="random weights of a known shape, e.g. llama3-8b")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is present, else cpu")  # fmt: skip
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV pool size")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--attention-backend", choices=["auto", *ATTENTION_BACKENDS], default=None,
                   help="triton: our kernels; fa2: torch's FlashAttention-2 (CUDA, "
                        "bf16/fp16); torch: the fp32 reference (default, auto: triton "
                        "on CUDA, torch on the CPU)")  # fmt: skip
    p.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", default=None,
                   action=argparse.BooleanOptionalAction,
                   help="reuse the KV of cached prompt prefixes, shared zero-copy between "
                        "requests (default: on)")  # fmt: skip
    p.add_argument("--async-scheduling", dest="async_scheduling", default=None,
                   action=argparse.BooleanOptionalAction,
                   help="launch each step before reading the last one's tokens "
                        "(default: on for CUDA, off on the CPU)")  # fmt: skip
    p.add_argument("--enable-sleep-mode", action="store_true",
                   help="weights in a virtual range that LLM.sleep() / POST /sleep give back "
                        "to the driver and wake_up maps again at the same addresses")  # fmt: skip
    p.add_argument("--sleep-keep-host-buffer", default=True,
                   action=argparse.BooleanOptionalAction,
                   help="keep level-1 sleep's pinned host buffer after wake_up, so only the "
                        "first sleep pays for pinning (default: on)")  # fmt: skip
    p.add_argument("--swap-space", type=float, default=0.0, metavar="GIB",
                   help="GiB of pinned host memory that preempted requests' KV is swapped to "
                        "instead of recomputed (default 0: off; vLLM's default is 4)")  # fmt: skip
    p.add_argument("--preemption-mode", choices=("swap", "recompute"), default=None,
                   help="force swap or recompute at preemption (default: a cost model "
                        "chooses per request when --swap-space is set)")  # fmt: skip
    p.add_argument("--ttft-slo-ms", type=float, default=None, metavar="MS",
                   help="time-to-first-token target: admit waiting requests by TTFT slack, and "
                        "swap out requests ahead of --tpot-slo-ms to admit one about to miss "
                        "it (needs --swap-space; default: off)")  # fmt: skip
    p.add_argument("--tpot-slo-ms", type=float, default=None, metavar="MS",
                   help="time-per-output-token target: only requests ahead of it are "
                        "swapped out for --ttft-slo-ms (default: off: any decoding request "
                        "may be)")  # fmt: skip
    p.add_argument("--unified-memory-pool", action="store_true",
                   help="one budget for the KV cache and the forward's workspace: the KV "
                        "borrows what the next step's activations do not need and gives it "
                        "back before a step that does (eLLM's inflate/deflate; "
                        "--kv-cache-gib is then that one budget)")  # fmt: skip
    add_offload_args(p)
    add_parallel_args(p)


def add_offload_args(p: argparse.ArgumentParser) -> None:
    """Weight offload to host memory (vLLM's --cpu-offload-gb, and a budget)."""
    g = p.add_argument_group("weight offload (layers stream from host memory through a ring)")
    g.add_argument("--cpu-offload-gb", type=float, default=0.0,
                   help="GiB of GPU memory to save by keeping layer weights in pinned host "
                        "memory (net of the ring they stream through); default 0")  # fmt: skip
    g.add_argument("--gpu-memory-budget", type=parse_bytes, default=None, metavar="BYTES",
                   help="GPU memory for the model: weights kept on the GPU, the ring and the "
                        "step's workspace (e.g. 40GiB, 4e10); the rest of the weights stream "
                        "from host memory. The KV cache is sized apart")  # fmt: skip
    g.add_argument("--offload-ring-depth", type=int, default=2,
                   help="layers the ring of GPU buffers holds (>= 2)")  # fmt: skip


_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``123``, ``4e10``, ``40GiB``, ``40G`` (decimal), ``512MiB``: a positive byte count."""
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("kmgtib")
    unit = t[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 40GiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return int(value)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """Tensor parallelism and its rendezvous (vLLM's names)."""
    g = p.add_argument_group("tensor parallelism (one process per GPU; torchrun's env wins)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N GPUs (N gloo processes on the CPU)")  # fmt: skip
    g.add_argument("--nnodes", type=int, default=1, help="machines the N ranks span")
    g.add_argument(
        "--node-rank",
        type=int,
        default=0,
        help="this machine's index: node 0 runs the engine, others serve it",
    )
    g.add_argument("--master-addr", default="127.0.0.1", help="node 0's address")
    g.add_argument(
        "--master-port",
        type=int,
        default=0,
        help="node 0's rendezvous port (default: a free one; one node only)",
    )


def engine_kwargs(args: Any) -> dict[str, Any]:
    kv = None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30)
    caching = getattr(args, "enable_prefix_caching", None)
    extra = {} if caching is None else {"enable_prefix_caching": caching}
    return extra | dict(
        model=args.model, shape=args.shape, device=args.device, dtype=args.dtype,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_bytes=kv,
        enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
        attention_backend=args.attention_backend,
        cpu_offload_gb=args.cpu_offload_gb, gpu_memory_budget=args.gpu_memory_budget,
        offload_ring_depth=args.offload_ring_depth,
        enable_sleep_mode=getattr(args, "enable_sleep_mode", False),
        swap_space_bytes=int(getattr(args, "swap_space", 0.0) * 2**30),
        preemption_mode=getattr(args, "preemption_mode", None),
        ttft_slo_ms=getattr(args, "ttft_slo_ms", None),
        tpot_slo_ms=getattr(args, "tpot_slo_ms", None),
        unified_memory_pool=getattr(args, "unified_memory_pool", False),
        sleep_keep_host_buffer=getattr(args, "sleep_keep_host_buffer", True),
        tensor_parallel_size=args.tensor_parallel_size, nnodes=args.nnodes,
        node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
    )  # fmt: skip


def serve_if_worker(kwargs: dict[str, Any]) -> bool:
    """On a process that is not tensor-parallel rank 0 (``--node-rank`` > 0, or torchrun's
    rank > 0): serve rank 0 as a worker until it shuts down, and return True."""
    from vtensor.engine.config import EngineConfig
    from vtensor.engine.tp_worker import process_rank, run_node

    config = EngineConfig(**kwargs)
    if not config.is_parallel or process_rank(config) == 0:
        return False
    rank = process_rank(config)
    print(f"tensor-parallel rank {rank}: serving rank 0", file=sys.stderr)
    run_node(config)
    return True


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate completions for prompts")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for a batch); default: two sample prompts")  # fmt: skip
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def main(args: Any) -> int:
    from vtensor import LLM, SamplingParams

    if serve_if_worker(engine_kwargs(args)):
        return 0
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed,
    )  # fmt: skip
    llm = LLM(**engine_kwargs(args))
    rt = llm.engine.runtime
    note = " (random weights: the text is gibberish)" if rt.random_weights else ""
    print(f"model: {rt.model_name}{note}; device {rt.device}, {rt.dtype}, "
          f"attention {rt.attention_backend}", file=sys.stderr)  # fmt: skip
    if llm.engine.offload is not None:
        print(llm.engine.offload.placement.describe(), file=sys.stderr)
    prompts = args.prompt or DEFAULT_PROMPTS
    if args.chat:
        prompts = [
            llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts
        ]
    with llm:
        outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
        for out in outputs:
            c = out.outputs[0]
            print(f"\nPrompt: {out.prompt!r}\nCompletion: {c.text!r}")
            print(f"  ({len(c.token_ids)} tokens, finish: {c.finish_reason})")
    return 0
