"""Compile SiLU·mul and the argmax kernels for the H100 (sm_90) without a GPU; print, as
JSON, each variant's global loads and stores (PTX) and cuobjdump's resource line.

``python -m tests.silu_argmax_sm90``, in a process without ``TRITON_INTERPRET`` (the
interpreter replaces the JIT functions the compiler needs). Exits 3 with a reason when
this Triton has no NVIDIA backend tools. The variants are the engine's: Llama-3's
shapes give 16-divisible sizes and strides and 16-byte aligned pointers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vtensor.kernels import activation, argmax

TOOL = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_sm90(
    kernel: Any, constexprs: dict[str, Any], pointers: dict[str, str], num_warps: int
) -> dict[str, Any]:
    """Every pointer and every int but the ones not specialized on marked 16-divisible."""
    loose = set(getattr(kernel, "do_not_specialize", ()))
    sig = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in kernel.arg_names}
    aligned = [i for i, a in enumerate(kernel.arg_names) if a not in constexprs and a not in loose]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    stages = constexprs.get("STAGES", 1)
    options = {"num_warps": num_warps, "num_stages": stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [str(TOOL), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    return {
        "kernel": kernel.fn.__name__,
        "constexprs": constexprs,
        "loads": sorted(set(re.findall(r"ld\.global[\w.]*", ptx))),
        "stores": sorted(set(re.findall(r"st\.global[\w.]*", ptx))),
        "usage": next(line.strip() for line in out.splitlines() if "REG:" in line),
    }


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
