"""Compatibility shims for running the kernels under Triton's CPU interpreter (TRITON_INTERPRET=1).

Triton 3.6's interpreter turns a loop bound such as `range(lo, hi)` with run-time `lo`/`hi` into
`int(np.ndarray of shape (1,))`, which numpy >= 2.4 refuses. Triton 3.9 squeezes the array first; we install the
same fix on older versions. Its `tl.dot` also multiplies bfloat16 operands as their raw uint16 bit patterns
(3.6 through 3.9): we widen them to float32 first (exact). Nothing changes on the GPU path.
"""

from __future__ import annotations

import os


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # read once: @triton.jit reads it at import


def interpreting() -> bool:
    return _INTERPRET


def patch_interpreter() -> None:
    if not interpreting():
        return
    try:
        import triton.runtime.interpreter as ip
    except ImportError:  # pragma: no cover
        return
    orig = getattr(ip, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_nha_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._nha_patched = True  # type: ignore[attr-defined]
    ip._patch_lang_tensor = patched

    import numpy as np
    import triton.language as tl

    orig_dot = ip.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype == tl.bfloat16:
            bits = h.data.astype(np.uint32) << np.uint32(16)
            return ip.TensorHandle(bits.view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    ip.InterpreterBuilder.create_dot = create_dot
