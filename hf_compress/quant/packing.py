"""Bit packing of 2-8 bit integer codes into int32 or uint8 words.

Values are laid out as one little-endian bit stream along the packed dimension: value ``k`` occupies
stream bits ``[k*bits, (k+1)*bits)`` and word ``w`` holds stream bits ``[w*W, (w+1)*W)`` (``W`` = 32 or 8).
For 2, 4 and 8 bits a word holds whole values; 3-bit values cross word boundaries (32 values fill three
int32 words). For int32 this is exactly the GPTQ/AutoGPTQ packing, 3-bit included.

The packed dimension is padded with zero codes to the smallest run of values that fills whole words
(``W/gcd(W, bits)`` values: 8 at 4 bits and 32 at 3 bits in int32, 2 at 4 bits in uint8);
``unpack_bits`` takes the original length and drops the padding.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_PACK_BITS = (2, 3, 4, 5, 6, 7, 8)
_WORD_BITS = {torch.int32: 32, torch.uint8: 8}


def _check(bits: int, container: torch.dtype) -> tuple[int, int, int]:
    """``(word bits, values per chunk, words per chunk)``: a chunk is the shortest run filling whole words."""
    if bits not in SUPPORTED_PACK_BITS:
        raise ValueError(f"bits must be an integer in 2..8, got {bits}")
    if container not in _WORD_BITS:
        raise ValueError(f"container must be torch.int32 or torch.uint8, got {container}")
    word = _WORD_BITS[container]
    g = math.gcd(word, bits)
    return word, word // g, bits // g


def packed_length(n: int, bits: int, container: torch.dtype = torch.int32) -> int:
    """Number of words that hold ``n`` values of ``bits`` bits (after padding ``n`` to whole word groups)."""
    _, chunk_values, chunk_words = _check(bits, container)
    return -(-n // chunk_values) * chunk_words


def pack_bits(values: torch.Tensor, bits: int, *, container: torch.dtype = torch.int32, dim: int = 0) -> torch.Tensor:
    """Pack unsigned codes in ``[0, 2**bits)`` along ``dim`` into ``container`` words."""
    word, chunk_values, chunk_words = _check(bits, container)
    if values.is_floating_point():
        raise TypeError("pack_bits takes integer codes, got a floating-point tensor")
    v = values.movedim(dim, 0).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack into {bits} bits")
    n = v.shape[0]
    pad = -n % chunk_values
    if pad:
        v = torch.cat([v, v.new_zeros((pad, *v.shape[1:]))])
    chunks = v.reshape(-1, chunk_values, *v.shape[1:])
    out = torch.zeros((chunks.shape[0], chunk_words, *v.shape[1:]), dtype=torch.int64, device=v.device)
    for j in range(chunk_values):
        offset = j * bits
        w, shift = divmod(offset, word)
        out[:, w] |= chunks[:, j] << shift
        spill = shift + bits - word
        if spill > 0:  # the value's high bits continue in the next word
            out[:, w + 1] |= chunks[:, j] >> (bits - spill)
    out &= (1 << word) - 1
    out = out.reshape(-1, *v.shape[1:])
    if container == torch.int32:
        out = torch.where(out >= 1 << 31, out - (1 << 32), out)  # two's complement wrap
    return out.to(container).movedim(0, dim).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int, *, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes along ``dim`` as int32."""
    word, chunk_values, chunk_words = _check(bits, packed.dtype)
    p = packed.movedim(dim, 0).to(torch.int64) & ((1 << word) - 1)
    if p.shape[0] % chunk_words:
        raise ValueError(f"packed length {p.shape[0]} is not a multiple of {chunk_words} words for {bits}-bit codes")
    chunks = p.reshape(-1, chunk_words, *p.shape[1:])
    mask = (1 << bits) - 1
    vals = []
    for j in range(chunk_values):
        offset = j * bits
        w, shift = divmod(offset, word)
        v = chunks[:, w] >> shift
        spill = shift + bits - word
        if spill > 0:
            v = v | (chunks[:, w + 1] << (bits - spill))
        vals.append(v & mask)
    out = torch.stack(vals, dim=1).reshape(-1, *p.shape[1:])
    if n > out.shape[0]:
        raise ValueError(f"asked for {n} values but the packed tensor holds at most {out.shape[0]}")
    return out[:n].to(torch.int32).movedim(0, dim).contiguous()


def pack_int4(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Two 4-bit codes per byte, low nibble first."""
    return pack_bits(values, 4, container=torch.uint8, dim=dim)


def unpack_int4(packed: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    return unpack_bits(packed, 4, n, dim=dim)
