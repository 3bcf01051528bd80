"""Every Triton launch runs under the CUDA device of the tensors it is given.

Triton takes the device it launches on, and the stream, from the *current* CUDA device
(`torch.cuda.current_device()`, which is per thread), while torch ops take theirs from their
tensors. An engine on `cuda:1` (a data-parallel replica, `LLM(device="cuda:1")`), or any engine
stepped from a thread that never set the device (the server's engine-loop thread), would otherwise
launch into device 0's context with device-1 pointers: an illegal memory access, or a silent race
with device 0's stream. The guard sits at the launch boundary, in each public launcher, so no
caller can get it wrong; it switches the device only when the current one differs (one cheap query
per launch otherwise). vLLM's Triton ops and Liger-Kernel's wrap their launches the same way.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def _device_of(args: tuple, kwargs: dict) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def on_tensor_device(launcher: F) -> F:
    """Run `launcher` with the current CUDA device set to its first tensor argument's device."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        device = _device_of(args, kwargs)
        if device is None or device.type != "cuda" or device.index == torch.cuda.current_device():
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    return launch  # type: ignore[return-value]
