"""The kernels take their variants as `KernelOptions` from nha_convert's backend and import nothing from nha_convert
(no import circle between the two packages)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from nha_convert import NHAError, backend
from tests.helpers.env import set_nha_env

KERNELS = Path(__file__).resolve().parents[2] / "kernels" / "nha_kernels"


def test_the_kernels_import_nothing_from_nha_convert():
    """Imports anywhere in a module count, those inside functions too."""
    found = []
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "nha_convert"]
    assert found == []


def test_kernel_options_follow_the_environment(monkeypatch):
    pytest.importorskip("triton")
    backend.resolve({})
    opts = backend.kernel_options()
    assert (opts.fwd, opts.fwd_state_span, opts.bwd_kv, opts.bwd_slot_tile, opts.triton_bwd, opts.gate_grad) == (
        "parallel", None, "split", None, "triton", "triton")
    assert opts.reference is backend.torch_op and backend.kernel_options() is opts  # one object per read
    for name, value, field, expected in [("NHA_FWD", "serial", "fwd", "serial"),
                                         ("NHA_FWD_STATE_SPAN", "0", "fwd_state_span", 0),
                                         ("NHA_BWD_KV", "split2", "bwd_kv", "split2"),
                                         ("NHA_BWD_SLOT_TILE", "32", "bwd_slot_tile", 32),
                                         ("NHA_TRITON_BWD", "reference", "triton_bwd", "reference"),
                                         ("NHA_GATE_GRAD", "torch", "gate_grad", "torch")]:
        set_nha_env(monkeypatch, name, value)
        assert getattr(backend.kernel_options(), field) == expected, name
    with backend.overriding(fwd="parallel", fwd_state_span=None):  # None: the kernels' default
        assert backend.kernel_options().fwd == "parallel" and backend.kernel_options().fwd_state_span is None
    assert backend.kernel_options().fwd == "serial"
    set_nha_env(monkeypatch, "NHA_BWD_SLOT_TILE", "48")
    with pytest.raises(NHAError, match="NHA_BWD_SLOT_TILE must be 16, 32 or 64, got 48"):
        backend.kernel_options()
    set_nha_env(monkeypatch, "NHA_BWD_SLOT_TILE", "64")
    set_nha_env(monkeypatch, "NHA_FWD", "fast")
    with pytest.raises(NHAError, match="NHA_FWD must be 'parallel' or 'serial', got 'fast'"):
        backend.kernel_options()
