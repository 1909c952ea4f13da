"""Compile the GEMV kernel for the H100 (sm_90) without a GPU; print cuobjdump's
resource line (registers, local memory) for each configuration, as JSON.

``python -m tests.gemv_sm90 '[[m, {GemvConfig fields}], ...]'``, in a process without
``TRITON_INTERPRET`` (the interpreter replaces the JIT functions the compiler needs).
Exits 3 with a reason when this Triton has no NVIDIA backend tools.
"""

from __future__ import annotations

import json
import sys

import triton

from vtensor.kernels import gemv as gemv_mod
from vtensor.kernels.gemv_config import GemvConfig

from .sm90_compile import TOOL, compile_sm90


def resource_usage(cfg: GemvConfig, m: int) -> str:
    """Compiled with the engine's specialization at the 8B shapes: pointers 16-byte
    aligned; N, K, the strides and the split length multiples of 16; M not specialized."""
    kernel = gemv_mod._gemv_kernel
    constexprs = dict(
        BLOCK_M=cfg.block_m(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        MODE=gemv_mod._MODE_IDS[cfg.mode], EVEN=True, DOT_F32=False, STAGES=cfg.num_stages,
    )  # fmt: skip
    pointers = dict.fromkeys(("X", "W", "Out"), "*bf16")
    return str(compile_sm90(kernel, constexprs, pointers, cfg.num_warps)["usage"])


def main() -> int:
    if not TOOL.exists():
        print(f"this triton ({triton.__version__}) has no NVIDIA backend tools")
        return 3
    cases = json.loads(sys.argv[1])
    print(json.dumps([resource_usage(GemvConfig(**cfg), m) for m, cfg in cases]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
