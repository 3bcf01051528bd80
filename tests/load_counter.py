"""Count the bytes a Triton kernel loads from a tensor, in Triton's interpreter.

Wraps the interpreter's masked load (every tl.load goes through it) and adds up the elements
whose address falls inside the tensor and whose mask is on: what a GPU would read from that
tensor, before caches. The sampler's "reads each row about once" is measured this way.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from triton.runtime import interpreter


@contextlib.contextmanager
def count_loads(tensor: torch.Tensor):
    """Yields a one-element list that holds the bytes loaded from `tensor` so far."""
    lo = tensor.data_ptr()
    hi = lo + tensor.numel() * tensor.element_size()
    loaded = [0]
    original = interpreter.InterpreterBuilder.create_masked_load

    def counting(self, ptrs, mask, other, *args):
        addresses = ptrs.data
        inside = (addresses >= lo) & (addresses < hi) & np.asarray(mask.data, dtype=bool)
        loaded[0] += int(inside.sum()) * tensor.element_size()
        return original(self, ptrs, mask, other, *args)

    interpreter.InterpreterBuilder.create_masked_load = counting
    try:
        yield loaded
    finally:
        interpreter.InterpreterBuilder.create_masked_load = original
