"""vtensor.kernels: Triton attention over the strided virtual KV layout.

Each kernel file holds the Triton kernel and a thin wrapper that checks
shapes, dtypes and strides; ``reference.py`` holds the fp32 torch versions
used by the tests and as the CPU fallback.
"""

from .decode import choose_num_splits, decode_attention
from .extend import extend_attention
from .fa2 import fa2_decode, fa2_extend
from .rope_store import rope_store_kv
from .splitk import DecodeWorkspace
from .store_kv import store_kv

__all__ = [
    "DecodeWorkspace",
    "choose_num_splits",
    "decode_attention",
    "extend_attention",
    "fa2_decode",
    "fa2_extend",
    "rope_store_kv",
    "store_kv",
]
