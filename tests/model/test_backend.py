"""backend.py: the NHA_* variables read once; backends chosen for a while without touching os.environ."""

from __future__ import annotations

import os

import pytest

from nha_convert import NHAError, backend


def test_backend_environment_is_read_once_and_overridable(monkeypatch):
    backend.resolve({})
    monkeypatch.setenv("NHA_BACKEND", "torch")
    monkeypatch.setenv("NHA_LOSS", "bogus")
    assert backend.environment().backend == "auto"  # not re-read by itself
    env = backend.resolve()
    assert env.backend == "torch" and backend.environment() is env
    with pytest.raises(NHAError, match="NHA_LOSS='bogus'"):
        backend.loss_choice()
    before = dict(os.environ)
    with backend.use_backend("triton"):
        assert backend.environment().backend == "triton" and backend.environment().loss == "bogus"
    assert backend.environment().backend == "torch" and dict(os.environ) == before
    with pytest.raises(NHAError, match="unknown NHA backend"):
        with backend.use_backend("cuda"):
            pass


def test_the_torch_backend_never_hands_out_the_kernels():
    import torch

    with backend.use_backend("torch"):
        assert backend.triton_kernels(torch.zeros(1)) is None
