"""Pack integer codes of 2-8 bits into bytes, least significant bit first.

Code i occupies bits [i*b, (i+1)*b) of the little-endian bit stream: two 4-bit codes per byte
(the first in the low nibble, as ONNX INT4 stores them), four 2-bit codes, eight 3-bit codes
per three bytes. Signed codes are stored as offsets from the grid's minimum (code - qmin), so
every packed field is an unsigned integer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from adaround.primitives import int_range


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take once packed."""
    return (count * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int, signed: bool) -> Tensor:
    """Flatten `codes` (int8 when signed, uint8 otherwise) into a uint8 tensor of packed bits.

    Example:
        >>> pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 4, signed=False)
        tensor([33,  3], dtype=torch.uint8)
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range: codes of 2 to 8 bits can be packed")
    qmin, qmax = int_range(bits, signed)
    flat = codes.detach().cpu().reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < qmin or int(flat.max()) > qmax):
        raise ValueError(f"codes outside [{qmin}, {qmax}] do not fit in {bits} bits")
    fields = (flat - qmin).to(torch.uint8).numpy()
    if bits == 8:
        return torch.from_numpy(fields.copy())
    stream = np.unpackbits(fields[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="little"))


def unpack_codes(packed: Tensor, count: int, bits: int, signed: bool) -> Tensor:
    """The `count` codes held in `packed`, as int8 (signed) or uint8, flat."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed codes must be a flat uint8 tensor")
    if packed.numel() != packed_size(count, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {count} codes of {bits} "
                         f"bits ({packed_size(count, bits)} bytes expected)")
    qmin, _ = int_range(bits, signed)
    data = packed.numpy()
    if bits == 8:
        fields = data.astype(np.int16)
    else:
        stream = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits)
        fields = np.packbits(stream, axis=1, bitorder="little")[:, 0].astype(np.int16)
    codes = torch.from_numpy(fields) + qmin
    return codes.to(torch.int8 if signed else torch.uint8)
