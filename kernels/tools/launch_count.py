"""Every GPU launch and host sync of one NHA forward + backward, listed on a machine without a GPU.

    python kernels/tools/launch_count.py                       # the training shapes of bench_kernels.py, T = 1K
    python kernels/tools/launch_count.py --rows 8 --seq 2048 --shape llama --window 512
    python kernels/tools/launch_count.py --json out.json

The op runs on meta tensors standing for CUDA ones (shapes, dtypes and strides, no data), exactly as the model's
training path calls it (nha_convert.backend.triton_chunk, packed rows, cu_seqlens on the host, valid None). Triton
launches are recorded instead of run; each torch op that would launch a CUDA kernel is recorded (views, reshapes and
other metadata-only ops are not); a host sync is any read of a device value on the host (`.item()`, `.tolist()`,
`bool()` of a CUDA tensor) and any blocking host-to-device copy (torch.tensor(list, device='cuda'), `.to(device)`
from pageable memory), which waits for the GPU to drain; a non_blocking copy counts as a launch (the launchers pin
its host side on CUDA). Shapes and the launch list match the GPU's because no branch of the host code
depends on device values (a sync would show here). The backward is run with torch.autograd.grad.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # run by path from anywhere: the checkout's nha_kernels and nha_convert
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT / "kernels" / "tools"), str(ROOT)]

DEV = "meta"  # shapes, dtypes and strides without data; stands for the GPU (every device tensor lives here)
SHAPES = {"smollm2": dict(hq=9, hkv=3, d=64, m=64), "llama": dict(hq=32, hkv=8, d=128, m=64)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="smollm2", help="heads and head dim")
    ap.add_argument("--rows", type=int, default=8, help="packed rows per step")
    ap.add_argument("--seq", type=int, default=1024, help="positions per row")
    ap.add_argument("--docs-per-row", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--calls", type=int, default=2, help="forward + backward calls (the layout is built in the first)")
    ap.add_argument("--json", default=None, help="write the lists here")
    return ap.parse_args(argv)


# Ops that only change metadata (no kernel), and the ones torch runs on the host.
_NO_KERNEL = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "select", "slice", "narrow",
              "unsqueeze", "squeeze", "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes",
              "chunk", "movedim", "diagonal", "view_as", "expand_as", "lift_fresh", "empty", "empty_like",
              "empty_strided", "new_empty", "new_empty_strided", "_reshape_alias", "flip_view", "sym_size",
              "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
              "set_", "resize_", "numel", "dim", "size", "stride", "prim_layout"}


def record(step, warm: int = 1):
    """Run `step()` (one forward + backward) `warm` times, then once recorded: (launches, syncs), each a list of
    (kind, name) in launch order. `step` builds its inputs on fake CUDA tensors itself."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import nha_kernels

    launches: list[tuple[str, str]] = []
    syncs: list[str] = []
    active = [False]

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            if name in ("_local_scalar_dense", "is_nonzero", "item"):
                if any(isinstance(a, torch.Tensor) and a.device.type == DEV for a in args) and active[0]:
                    syncs.append(f"{name} (a device value read on the host)")
                return 0 if name != "is_nonzero" else True
            out = func(*args, **kwargs)
            if not active[0]:
                return out
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if name in ("_to_copy", "copy_", "clone"):
                src = tensors[-1] if name == "copy_" else tensors[0]
                dst = out if name != "copy_" else tensors[0]
                if not src.device.type == DEV and dst.device.type == DEV:
                    # non_blocking: the launchers pin the host side on CUDA (prep.to_device), so it does not wait
                    if not kwargs.get("non_blocking"):
                        syncs.append(f"{name} host -> device {tuple(src.shape)}")
                    launches.append(("copy", "host -> device" + (" (async)" if kwargs.get("non_blocking") else "")))
                elif dst.device.type == DEV:
                    launches.append(("torch", name))
                return out
            if name in _NO_KERNEL:
                return out
            results = out if isinstance(out, (tuple, list)) else [out]
            if any(isinstance(r, torch.Tensor) and r.device.type == DEV for r in results) or any(t.device.type == DEV for t in tensors):
                launches.append(("torch", name))
            return out

    # `kernel[grid](...)` calls `run` of the kernel's class: JITFunction, or InterpretedFunction under
    # TRITON_INTERPRET=1 (whichever the kernels were imported with).
    kinds = {type(obj) for mod in list(sys.modules.values()) if mod and mod.__name__.startswith(nha_kernels.__name__)
             for obj in vars(mod).values() if hasattr(obj, "fn") and hasattr(type(obj), "run")}
    runs = {kind: kind.run for kind in kinds}

    def fake_run(self, *args, grid=None, warmup=False, **kwargs):
        if active[0]:
            launches.append(("triton", self.fn.__name__))
        return None

    tensor = torch.tensor

    def device_tensor(data, *args, **kwargs):  # torch.tensor(python data, device="cuda"): a copy from pageable memory
        out = tensor(data, *args, **kwargs)
        if active[0] and out.device.type == DEV:
            syncs.append(f"torch.tensor(..., device='cuda') {tuple(out.shape)}: host -> device copy")
            launches.append(("copy", "host -> device"))
        return out

    for kind in kinds:
        kind.run = fake_run
    torch.tensor = device_tensor
    try:
        with Recorder():
            for i in range(warm + 1):
                active[0] = i == warm
                step()
    finally:
        for kind, run in runs.items():
            kind.run = run
        torch.tensor = tensor
    return launches, syncs


def training_step(shape: dict, rows: int, seq: int, docs: int, window: int, sinks: int):
    """One forward + backward of the training shapes as bench_kernels.py's training rows run it (a closure over the
    inputs, made under the fake mode on its first call)."""
    import torch

    from bench_kernels import packed_cu_seqlens
    from nha_convert.backend import triton_chunk

    cu = torch.tensor(packed_cu_seqlens(rows, seq, docs), dtype=torch.int32)  # on the host, as the layer hands it
    state: dict = {}

    def step():
        if not state:
            n, hq, hkv, d, m = rows * seq, shape["hq"], shape["hkv"], shape["d"], shape["m"]
            mk = lambda h: torch.empty(1, h, n, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)  # noqa
            state["xs"] = [mk(hq), mk(hq), mk(hkv), mk(hkv), mk(hkv),
                           torch.empty(1, hkv, n, m, device=DEV, requires_grad=True)]
            state["do"] = torch.empty(1, hq, n, d, device=DEV, dtype=torch.bfloat16)
        xs = state["xs"]
        o = triton_chunk(*xs, window=window, num_sinks=sinks, scale=shape["d"] ** -0.5, valid=None, cu_seqlens=cu)[0]
        torch.autograd.grad(o, xs, state["do"])

    return step


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    step = training_step(SHAPES[args.shape], args.rows, args.seq, args.docs_per_row, args.window, args.sinks)
    launches, syncs = record(step, warm=args.calls - 1)
    counts = Counter(f"{kind}: {name}" for kind, name in launches)
    print(f"{args.shape} {SHAPES[args.shape]}, {args.rows} x {args.seq}, {args.docs_per_row} documents a row, "
          f"w = {args.window}, {args.sinks} sinks: forward + backward, call {args.calls}")
    print(f"{len(launches)} launches ({sum(k == 'triton' for k, _ in launches)} Triton), {len(syncs)} host syncs")
    for name, n in counts.most_common():
        print(f"  {n:3d}  {name}")
    for s in syncs:
        print(f"  sync: {s}")
    if args.json:
        Path(args.json).write_text(json.dumps({"launches": launches, "syncs": syncs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
