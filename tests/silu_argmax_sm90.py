"""Compile SiLU·mul and the argmax kernels for the H100 (sm_90) without a GPU; print, as
JSON, each variant's global loads and stores (PTX) and cuobjdump's resource line.

``python -m tests.silu_argmax_sm90``, in a process without ``TRITON_INTERPRET`` (the
interpreter replaces the JIT functions the compiler needs). Exits 3 with a reason when
this Triton has no NVIDIA backend tools. The variants are the engine's: Llama-3's
shapes give 16-divisible sizes and strides and 16-byte aligned pointers.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import triton

from vtensor.kernels import activation, argmax

from .sm90_compile import TOOL, compile_sm90


def cases() -> list[dict[str, Any]]:
    silu, split = activation._silu_mul_kernel, argmax._argmax_split_kernel
    cfg = argmax.ArgmaxConfig()
    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        for even in (True, False):
            consts = {"BLOCK": activation.BLOCK, "EVEN": even, "LIBDEVICE": True}
            ptrs = {"X": f"*{dtype}", "Out": f"*{dtype}"}
            out.append(compile_sm90(silu, consts, ptrs, activation.NUM_WARPS))
        consts = {"BLOCK": cfg.block, "STAGES": cfg.stages}
        out.append(compile_sm90(split, consts, {"X": f"*{dtype}", "Part": "*i32"}, cfg.num_warps))
    return out


def main() -> int:
    if not TOOL.exists():
        print(f"this triton ({triton.__version__}) has no NVIDIA backend tools")
        return 3
    print(json.dumps(cases()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
