"""Bit packing and the GPTQ layout: exact round trips, the GPTQ bit order, padding, shapes."""

import pytest
import torch

from hf_compress.quant.layout import (
    QuantizedWeight,
    default_g_idx,
    dequantize_layout,
    num_groups,
    pack_layout,
    packed_shapes,
)
from hf_compress.quant.packing import pack_bits, pack_int4, packed_length, unpack_bits, unpack_int4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("container", [torch.int32, torch.uint8])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 704])
def test_round_trip(bits, container, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    v = torch.randint(0, 1 << bits, (n, 5), generator=g, dtype=torch.int32)
    p = pack_bits(v, bits, container=container, dim=0)
    assert p.dtype == container and p.shape == (packed_length(n, bits, container), 5)
    assert torch.equal(unpack_bits(p, bits, n, dim=0), v)
    p1 = pack_bits(v.t(), bits, container=container, dim=1)
    assert torch.equal(unpack_bits(p1, bits, n, dim=1), v.t())


def gptq_reference_pack(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's packing loop (3-bit spills across words), written out literally."""
    w = intweight.to(torch.int64)
    rows = w.shape[0] // 32 * bits
    q = torch.zeros((rows, w.shape[1]), dtype=torch.int64)
    i = row = 0
    while row < rows:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                q[row] |= w[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                q[row] |= w[j] << (3 * (j - i))
            i += 10
            q[row] |= w[i] << 30
            row += 1
            q[row] |= (w[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                q[row] |= w[j] << (3 * (j - i) + 1)
            i += 10
            q[row] |= w[i] << 31
            row += 1
            q[row] |= (w[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                q[row] |= w[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    q &= 0xFFFFFFFF
    return torch.where(q >= 2**31, q - 2**32, q).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int32_packing_is_the_gptq_bit_order(bits):
    v = torch.randint(0, 1 << bits, (96, 4), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(pack_bits(v, bits), gptq_reference_pack(v, bits))


def test_int4_bytes_low_nibble_first():
    assert pack_int4(torch.tensor([1, 2, 15, 0, 7])).tolist() == [0x21, 0x0F, 0x07]
    assert unpack_int4(torch.tensor([0x21, 0x0F], dtype=torch.uint8), 4).tolist() == [1, 2, 15, 0]


def test_pack_rejects_out_of_range_and_float():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(TypeError, match="integer codes"):
        pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        pack_bits(torch.tensor([1]), 1)


def test_layout_shapes_with_padding():
    # pydoc-llama-6m's down_proj: 704 inputs (22 runs of 32 three-bit values), 256 outputs.
    s = packed_shapes(704, 256, 3, 128)
    assert s == {"qweight": (66, 256), "qzeros": (6, 24), "scales": (6, 256), "g_idx": (704,)}
    assert packed_shapes(100, 10, 4, -1) == {"qweight": (13, 10), "qzeros": (1, 2), "scales": (1, 10), "g_idx": (100,)}
    assert packed_shapes(100, 10, 3, 32)["qweight"] == (12, 10)  # 3-bit pads to 128 values = 12 words
    assert num_groups(704, 128) == 6 and default_g_idx(10, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="unsupported bits=5"):
        packed_shapes(64, 64, 5, -1)
    with pytest.raises(ValueError, match="group_size must be -1"):
        num_groups(64, 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_layout_dequantizes_exactly(bits):
    g = torch.Generator().manual_seed(7)
    out_f, in_f, gs = 37, 70, 32  # odd sizes; groups 32, 32, 6
    ng = num_groups(in_f, gs)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 1 << bits, (out_f, ng), generator=g, dtype=torch.int32)
    scales = torch.rand(out_f, ng, generator=g) + 0.1
    qw = QuantizedWeight(codes, scales, zeros, default_g_idx(in_f, gs), bits, gs)
    packed = qw.pack()
    assert {k: tuple(v.shape) for k, v in packed.items()} == packed_shapes(in_f, out_f, bits, gs)
    w = dequantize_layout(**packed, bits=bits, in_features=in_f)
    gi = torch.arange(in_f) // gs
    expected = (codes - zeros[:, gi]).float() * scales[:, gi]
    assert torch.equal(w, expected)
    assert torch.equal(qw.dequantize(), expected)
    assert torch.equal(pack_layout(codes, zeros, scales, qw.g_idx, bits)["qweight"], packed["qweight"])
