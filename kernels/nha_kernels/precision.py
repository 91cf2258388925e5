"""How the kernels keep fp32 accuracy in their products: the host-side choices the launchers pass as constexprs
(SPLIT, PREC, PREC_SLOT, FAST_LIMIT) and the device-side product of fp32 slot quantities (`_mm_state`).
Every kernel (forward, backward, decode) takes its precision from here."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FAST_LIMIT = -80.0  # smallest block log decay for the factored (matrix) path of the slot recurrence


def split_products(dtype: torch.dtype) -> bool:
    """The kernels' SPLIT: bf16 inputs multiply fp32 slot quantities as bf16 hi + lo parts on the bf16 tensor cores.
    fp32 and fp16 inputs take 3-pass tf32 products instead (fp16 is exact in tf32; as bf16 parts it would lose 3
    mantissa bits, and bf16 and fp16 tiles cannot meet in one product)."""
    return dtype == torch.bfloat16


def precisions(dtype: torch.dtype) -> tuple[str, str]:
    """(dots of input-dtype operands, dots of fp32 slot operands). fp32 inputs get 3-pass tf32 (about fp32 accuracy,
    and it compiles in seconds where exact fp32 products take minutes)."""
    return ("tf32x3", "tf32x3") if dtype == torch.float32 else ("tf32", "tf32")


@triton.jit
def _mm_state(a, b, SPLIT: tl.constexpr):
    """a @ b with fp32 accuracy where one side or both are fp32 slot quantities (states, probabilities) and the
    rest is in the input dtype (the decode kernel also passes two input-dtype operands: one plain product).

    bf16 inputs (SPLIT): each fp32 operand is split into bf16 hi + lo parts, so the products run on the bf16 tensor
    cores and carry ~16 mantissa bits (lo x lo dropped). fp32 and fp16 inputs: one 3-pass tf32 product
    (`split_products`)."""
    if SPLIT:
        if a.dtype == tl.float32 and b.dtype == tl.float32:
            a_hi = a.to(tl.bfloat16)
            b_hi = b.to(tl.bfloat16)
            return (tl.dot(a_hi, b_hi) + tl.dot(a_hi, (b - b_hi.to(tl.float32)).to(tl.bfloat16))
                    + tl.dot((a - a_hi.to(tl.float32)).to(tl.bfloat16), b_hi))
        elif a.dtype != tl.float32 and b.dtype != tl.float32:
            return tl.dot(a, b)
        elif a.dtype == tl.float32:
            a_hi = a.to(tl.bfloat16)
            a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
            return tl.dot(a_hi, b.to(tl.bfloat16)) + tl.dot(a_lo, b.to(tl.bfloat16))
        else:
            b_hi = b.to(tl.bfloat16)
            b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
            return tl.dot(a, b_hi) + tl.dot(a, b_lo)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
