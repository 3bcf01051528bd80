"""Backend selection: the engine's choice, never the kernels' (DESIGN.md, "Backends")."""
from __future__ import annotations

import pytest
import torch

from elastic_decode import ElasticDecodeError
from elastic_decode.backend import select_ops


def test_auto_on_cpu_is_the_reference():
    assert select_ops(torch.device("cpu"), "auto").name == "reference"


def test_env_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("ELASTIC_DECODE_BACKEND", "reference")
    assert select_ops(torch.device("cpu")).name == "reference"
    monkeypatch.setenv("ELASTIC_DECODE_BACKEND", "fast")
    with pytest.raises(ElasticDecodeError, match="backend must be one of auto, triton, reference"):
        select_ops(torch.device("cpu"))


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ElasticDecodeError, match="TRITON_INTERPRET=1"):
        select_ops(torch.device("cpu"), "triton")
