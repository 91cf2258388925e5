"""Fused Triton kernels for Native Hybrid Attention (NHA): training/prefill forward and backward, and decode.

`nha_chunk_triton` has the signature and return value of `nha_convert.ops.nha_chunk` (plus `cu_seqlens` for packed
sequences); `nha_decode_step` is `NHAState.step` as one kernel that updates the state in place.
"""

from ._compat import patch_interpreter

patch_interpreter()

from .autograd import nha_chunk_triton  # noqa: E402
from .decode import nha_decode_step  # noqa: E402

__all__ = ["nha_chunk_triton", "nha_decode_step"]
