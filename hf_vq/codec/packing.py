"""Bit-packing of integer codes to exactly `bits` bits each (the on-disk and in-memory stored form).

Codes are packed **row by row**: row `r` of a `[rows, n]` code matrix becomes the little-endian bit
stream `code[r, 0] | code[r, 1] << bits | ...` cut into bytes, padded with zeros to a whole byte.
Padding costs at most 7 bits per row. With `bits == 8` packing is the identity on uint8 codes, and
with `bits == 16` it is a little-endian byte view: the common cases cost nothing.
"""

from __future__ import annotations

import torch

__all__ = ["bits_for", "packed_row_bytes", "pack_codes", "unpack_codes", "code_dtype"]


def bits_for(k: int) -> int:
    """Bits per code for `k` codewords: `ceil(log2(k))`, at least 1."""
    return max(1, (int(k) - 1).bit_length())


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes taken by one packed row of `n` codes of `bits` bits."""
    return (n * bits + 7) // 8


def code_dtype(bits: int) -> torch.dtype:
    """In-memory dtype of unpacked codes: uint8 up to 8 bits, else int32 (int16 breaks DDP over gloo)."""
    return torch.uint8 if bits <= 8 else torch.int32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes row by row into bytes.

    Args:
        codes (`torch.Tensor`): integer tensor `[rows, n]` with values in `[0, 2**bits)`.
        bits (`int`): bits per code, 1 to 16.

    Returns:
        `torch.Tensor`: uint8 tensor `[rows, ceil(n * bits / 8)]`.

    Raises:
        `ValueError`: if a code does not fit in `bits` bits.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits} must be between 1 and 16.")
    if codes.dim() != 2:
        raise ValueError(f"codes must be a [rows, n] matrix, got shape {tuple(codes.shape)}.")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes range [{int(codes.min())}, {int(codes.max())}] does not fit in {bits} bits.")
    rows, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits == 16:
        # little-endian bytes of each 16-bit code
        c = codes.to(torch.int32)  # [rows, n]
        return torch.stack([c & 0xFF, c >> 8], dim=-1).to(torch.uint8).reshape(rows, 2 * n)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)  # [bits]
    bit_stream = ((codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)  # [rows, n*bits]
    n_bytes = packed_row_bytes(n, bits)
    pad = n_bytes * 8 - n * bits
    if pad:
        bit_stream = torch.nn.functional.pad(bit_stream, (0, pad))
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int32)  # [8]
    return (bit_stream.reshape(rows, n_bytes, 8) * weights).sum(-1).to(torch.uint8)  # [rows, n_bytes]


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of [`pack_codes`].

    Args:
        packed (`torch.Tensor`): uint8 tensor `[rows, ceil(n * bits / 8)]`.
        bits (`int`): bits per code.
        n (`int`): codes per row.

    Returns:
        `torch.Tensor`: codes `[rows, n]`, uint8 when `bits <= 8`, else int32.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed codes must be a uint8 [rows, bytes] tensor, got {packed.dtype} {tuple(packed.shape)}.")
    rows, n_bytes = packed.shape
    if n_bytes != packed_row_bytes(n, bits):
        raise ValueError(
            f"packed codes have {n_bytes} bytes per row, expected {packed_row_bytes(n, bits)} for {n} codes of {bits} bits."
        )
    if bits == 8:
        return packed
    if bits == 16:
        b = packed.reshape(rows, n, 2).to(torch.int32)  # [rows, n, 2]
        return b[..., 0] | (b[..., 1] << 8)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)  # [8]
    bit_stream = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(rows, n_bytes * 8)[:, : n * bits]
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)  # [bits]
    codes = (bit_stream.reshape(rows, n, bits) * weights).sum(-1)  # [rows, n]
    return codes.to(code_dtype(bits))
