"""Conversions between torch state dicts and Flower records, in the precision messages travel.

Weights travel in ``federation.message_dtype``: ``float32`` as trained, or ``float16`` /
``bfloat16`` for half the bytes. Only floating-point arrays are rounded (integer buffers travel
as they are), and everything that receives them works in float32 again: hospitals train in full
precision and the server aggregates in full precision. A float16 array whose values do not fit
float16 (beyond +-65504) travels in float32 instead. NumPy, and so Flower's arrays, have no
bfloat16: a bfloat16 array travels as the int16 bit patterns of its values, and in a bfloat16
message every int16 array is read back that way (the networks have no int16 buffers).

Packed messages (``federation.pack_messages``, the default) carry all of a message's arrays as
one: Flower sends every array of a record as its own object, one request each way between
SuperLink, SuperNode and ClientApp, and a GAN's thirty-odd tensors cost more in requests than
in bytes. :func:`pack` writes them into one ``uint8`` array (a JSON header of names, dtypes and
shapes, then their bytes); :func:`unpack` reads them back exactly and refuses a buffer whose
length does not match its header. Both ends decide by the record itself: a packed record has
the one key :data:`PACKED_KEY`, and a hospital answers in the layout it received.

Rounding to nearest bounds the error of one array element by its unit roundoff,
``|x16 - x| <= u * |x| + s``: ``u`` = 2^-11 and ``s`` = 2^-25 (the subnormal spacing / 2) for
float16, ``u`` = 2^-8 and ``s`` ~ 0 for bfloat16 (:data:`ROUNDING`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedgan.config import MESSAGE_DTYPES

#: ``(u, s)`` of each message dtype: ``|rounded - x| <= u * |x| + s`` for in-range values.
ROUNDING = {"float32": (0.0, 0.0), "float16": (2.0**-11, 2.0**-25), "bfloat16": (2.0**-8, 0.0)}

_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def _encode(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "float32" or not tensor.is_floating_point():
        return tensor
    if dtype == "float16":
        finite = tensor[torch.isfinite(tensor)]
        if finite.numel() and float(finite.abs().max()) > _FLOAT16_MAX:
            return tensor  # would overflow to inf: this one travels in full precision
        return tensor.to(torch.float16)
    return tensor.to(torch.bfloat16).view(torch.int16)


def _decode(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array, copy=True))
    if tensor.dtype == torch.float16:
        return tensor.float()
    if dtype == "bfloat16" and tensor.dtype == torch.int16:
        return tensor.view(torch.bfloat16).float()
    return tensor


def to_arrays(state: Mapping[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    """A packed state dict (``generator.*`` / ``discriminator.*``) as one ArrayRecord, its
    floating-point arrays in ``dtype`` (one of :data:`MESSAGE_DTYPES`)."""
    if dtype not in MESSAGE_DTYPES:
        raise ValueError(f"unknown message dtype {dtype!r}; choose one of {MESSAGE_DTYPES}")
    return ArrayRecord({k: _encode(v.detach().cpu(), dtype) for k, v in state.items()})


def from_arrays(arrays: ArrayRecord, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_arrays`, in float32 (copies, so the record's buffers stay
    untouched)."""
    return {k: _decode(a.numpy(), dtype) for k, a in arrays.items()}


def in_full_precision(arrays: ArrayRecord, dtype: str) -> ArrayRecord:
    """A received record with its arrays back in float32 (itself when ``dtype`` is float32)."""
    if dtype == "float32":
        return arrays
    return to_arrays(from_arrays(arrays, dtype))


def nbytes(arrays: ArrayRecord) -> int:
    """Payload size of an ArrayRecord in bytes."""
    return int(sum(len(a.data) for a in arrays.values()))


#: The one key of a packed record (:func:`pack`).
PACKED_KEY = "fedgan.packed"
_HEADER_BYTES = 8  # the JSON header's length, little-endian


def pack(arrays: ArrayRecord) -> ArrayRecord:
    """All of ``arrays`` as one ``uint8`` array: an 8-byte length, a JSON header of
    ``[name, dtype, shape]`` rows in order, then each array's bytes (C order)."""
    header, parts = [], []
    for key, array in arrays.items():
        value = np.asarray(array.numpy(), order="C")  # (ascontiguousarray makes 0-d 1-d)
        header.append([key, value.dtype.str, list(value.shape)])
        parts.append(value.tobytes())
    head = json.dumps(header).encode()
    buffer = len(head).to_bytes(_HEADER_BYTES, "little") + head + b"".join(parts)
    return ArrayRecord({PACKED_KEY: Array(np.frombuffer(buffer, dtype=np.uint8))})


def unpack(arrays: ArrayRecord) -> ArrayRecord:
    """The record :func:`pack` packed (a record that is not packed is returned as it is).
    Raises ``ValueError`` for a packed buffer that does not match its own header."""
    if set(arrays) != {PACKED_KEY}:
        return arrays
    buffer = arrays[PACKED_KEY].numpy().tobytes()
    try:
        size = int.from_bytes(buffer[:_HEADER_BYTES], "little")
        header = json.loads(buffer[_HEADER_BYTES : _HEADER_BYTES + size])
        offset = _HEADER_BYTES + size
        out = {}
        for key, dtype_str, shape in header:
            dtype = np.dtype(dtype_str)
            count = math.prod(shape)
            if offset + count * dtype.itemsize > len(buffer):
                raise ValueError("the buffer ends before its arrays do")
            value = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
            out[str(key)] = Array(value.reshape(shape).copy())
            offset += count * dtype.itemsize
    except (ValueError, TypeError, json.JSONDecodeError) as bad:
        raise ValueError(f"malformed packed message: {bad}") from None
    if offset != len(buffer):
        raise ValueError(f"malformed packed message: {len(buffer) - offset} bytes after its arrays")
    return ArrayRecord(out)
