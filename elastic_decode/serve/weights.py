"""Weights posted to /update_weights, read without holding the body in memory and refused early.

A safetensors body is 8 bytes of header length, a JSON header naming every tensor's dtype, shape and
byte range, then the data. The body is streamed to a temporary file; as soon as the header is in, it is
checked (a safetensors file at all, floating dtypes only, names and shapes the model has, the size it
declares within the bound), so junk or a wrong model is a 400 after a few bytes, not after gigabytes. The
tensors are then read from the file (memory-mapped) on a worker thread. Values are checked by the engine,
in the dtype of the weights they go into (LlamaForCausalLM.check_weights), before anything is applied.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from fastapi import Request

from ..errors import ElasticDecodeError, InvalidRequestError
from .errors import BodyTooLarge

# HF name -> the shape it loads as; None: a name that is not loaded; raises for a name the model does not have
ShapeOf = Callable[[str], "tuple[int, ...] | None"]

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound on the JSON header
DRAIN_BYTES = 256 * 2**20  # a refused body is read on (and dropped) up to this much before the answer
# The safetensors dtypes a weight can come in (converted to the model's dtype when copied): floats only.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def check_header(header: dict, shape_of: ShapeOf) -> int:
    """The data size the header declares, after checking every entry against the model's weights."""
    if not isinstance(header, dict):
        raise InvalidRequestError("the body is not a safetensors file: its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise InvalidRequestError(f"the body is not a safetensors file: entry {name!r} is malformed")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in FLOAT_DTYPES:
            raise InvalidRequestError(f"weight {name!r} has dtype {dtype}; weights must be floating point "
                                      f"({', '.join(sorted(FLOAT_DTYPES))}); nothing was loaded")
        try:
            want = shape_of(name)
        except ElasticDecodeError as e:
            raise InvalidRequestError(f"{e}; nothing was loaded") from None
        if want is not None and tuple(shape) != want:
            raise InvalidRequestError(f"weight {name!r} has shape {tuple(shape)}, expected {want}; nothing was loaded")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InvalidRequestError(f"the body is not a safetensors file: entry {name!r} has bad offsets")
        end = max(end, offsets[1])
    return end


async def receive_safetensors(request: Request, limit: int, shape_of: ShapeOf) -> Path:
    """Stream a safetensors body into a temporary file, checking its header as soon as it arrives; returns
    the file (the caller deletes it). A body refused early is read on (and dropped, up to DRAIN_BYTES) before
    the answer: a client still sending it when the connection closed would see a reset, not the error."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(limit)
    fd, name = tempfile.mkstemp(prefix="elastic-decode-weights-", suffix=".safetensors")
    path = Path(name)
    chunks = request.stream()
    try:
        with os.fdopen(fd, "wb") as f:
            head, expected, size = b"", None, 0
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise BodyTooLarge(limit)
                    if expected is not None and size > expected:
                        raise InvalidRequestError(f"the body is longer than its safetensors header says ({expected} "
                                                  "bytes)")
                    f.write(chunk)
                    if expected is None:
                        head += chunk
                        expected = _declared_size(head, shape_of, limit)
            except (InvalidRequestError, BodyTooLarge):
                await _drop(chunks)
                raise
            if size == 0:
                raise InvalidRequestError("the body is empty: send the weights as safetensors bytes")
            if expected is None or size < expected:
                raise InvalidRequestError(f"the body ended after {size} bytes; its safetensors header says "
                                          f"{expected if expected is not None else 'more'}")
        return path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


async def _drop(chunks) -> None:
    dropped = 0
    async for chunk in chunks:
        dropped += len(chunk)
        if dropped > DRAIN_BYTES:
            return


def _declared_size(head: bytes, shape_of: ShapeOf, limit: int) -> int | None:
    """The whole body's size from its header, once the header is in `head`; None until then."""
    if len(head) < 8:
        return None
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > MAX_HEADER_BYTES or header_len < 2:
        raise InvalidRequestError("the body is not a safetensors file (it does not start with a header length)")
    if len(head) < 8 + header_len:
        return None
    try:
        header = json.loads(head[8 : 8 + header_len])
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the body is not a safetensors file: its header is not JSON") from None
    expected = 8 + header_len + check_header(header, shape_of)
    if expected > limit:
        raise BodyTooLarge(limit)
    return expected


def read_file(path: Path) -> list:
    """(name, tensor) of a safetensors file (run on a worker thread)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return [(name, f.get_tensor(name)) for name in f.keys()]
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise InvalidRequestError(f"the body is not a safetensors file: {e}") from None


def read_checkpoint(folder: Path) -> list:
    """(name, tensor) of every *.safetensors file of a checkpoint directory on this machine (a worker thread)."""
    if not folder.is_dir():
        raise InvalidRequestError(f"{folder} is not a directory on the server", param="path")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidRequestError(f"{folder} holds no .safetensors files", param="path")
    tensors = []
    for file in files:
        try:
            tensors += read_file(file)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"cannot read {file}: {e}", param="path") from None
    return tensors
