"""What the scripts in kernels/tools (bench_kernels.py, gpu_check.py) share: timing, the copy bandwidth, random NHA
inputs, the bytes the op must move, and one decode step timed from a CUDA graph.

Imported by those scripts after they have put the checkout's `kernels/` and root on sys.path; only `nha_bytes`
runs without a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of `fn` after warm-up (triton.testing.do_bench; warmup and rep are in ms)."""
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(512 * 1024 * 1024 // 2, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep=200)
    return 2 * src.numel() * 2 / (ms * 1e-3)


def inputs(b, hq, h, t, d, m, dtype=torch.bfloat16, seed=0):
    """q, q_rot (b, hq, t, d), k, k_rot, v (b, h, t, d) in `dtype`, log-decays (b, h, t, m) fp32 as trained gates
    look (`logsigmoid(2 + 2 N(0,1)) / 8`)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    xs = [r(b, hq, t, d).to(dtype), r(b, hq, t, d).to(dtype), r(b, h, t, d).to(dtype), r(b, h, t, d).to(dtype),
          r(b, h, t, d).to(dtype)]
    la = F.logsigmoid(2 + 2 * r(b, h, t, m)) / 8
    return xs + [la]


def nha_bytes(tokens: int, hq: int, hkv: int, d: int, m: int, backward: bool = False, elt: int = 2) -> int:
    """Bytes the NHA op must move for `tokens` positions (B * T): q, q_rot (hq heads), k, k_rot, v (hkv heads) in
    the input dtype (`elt` bytes), the gates in fp32, the output in the input dtype. The backward also reads dO and
    writes a gradient per input (the forward's reads again are not counted)."""
    fwd = tokens * (2 * hq * d * elt + 3 * hkv * d * elt + hkv * m * 4 + hq * d * elt)
    if not backward:
        return fwd
    return fwd + tokens * (hq * d * elt + 2 * hq * d * elt + 3 * hkv * d * elt + hkv * m * 4)


def decode_setup(batch: int, hq: int, h: int, d: int, m: int, window: int, sinks: int = 4):
    """A windowed NHA layer's decode state for `batch` sequences, prefilled with window + 37 tokens by the Triton
    kernel, and the next step's inputs as a model passes them: (state, step args)."""
    from nha_convert.ops.recurrent import NHAState
    from nha_convert.backend import triton_chunk as nha_chunk_triton

    pre = window + 37
    ys = inputs(batch, hq, h, pre + 1, d, m, seed=3)
    valid = torch.ones(batch, pre + 1, dtype=torch.bool, device="cuda")
    head = [y[:, :, :pre] for y in ys]
    _, slots = nha_chunk_triton(*head, window=window, num_sinks=sinks, scale=d**-0.5, valid=valid[:, :pre],
                                return_state=True)
    st = NHAState.from_prefill(head[2], head[3], head[4], head[5], valid[:, :pre], slots, window=window,
                               num_sinks=sinks)
    return st, [y[:, :, pre].contiguous() for y in ys] + [valid[:, pre].contiguous()]


def time_decode(batch: int, hq: int, h: int, d: int, m: int, window: int, sinks: int = 4,
                long_context: bool = True) -> dict:
    """One decode step of a windowed NHA layer for `batch` sequences (state from `decode_setup`): milliseconds of
    an eager call and of a CUDA-graph replay (Python launch overhead excluded), the same after 10^6 more positions
    (same state, same work: checks that decode does not depend on the context length), and the bytes the state
    holds (`NHAState.nbytes`)."""
    from nha_kernels.decode import nha_decode_step

    st, step = decode_setup(batch, hq, h, d, m, window, sinks)
    out = dict(state_bytes=st.nbytes())
    out["eager_ms"] = bench(lambda: nha_decode_step(st, *step, scale=d**-0.5), rep=100)

    def graphed(state):
        # Replays of one captured step (same position each replay: same work) time the GPU, not Python launches.
        for _ in range(2):
            nha_decode_step(state, *step, scale=d**-0.5)
        seen = state.seen
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            nha_decode_step(state, *step, scale=d**-0.5)
        state.seen = seen
        return bench(gr.replay, rep=100)

    out["ms"] = graphed(st)
    if long_context:
        st.seen += 10**6  # context length 1M: same state size, same work
        st.pos += 10**6
        out["ms_at_1M"] = graphed(st)
    return out
