import pytest
import torch

from hf_vq.codec import bits_for, pack_codes, packed_row_bytes, unpack_codes


@pytest.mark.parametrize("k", [2, 3, 4, 5, 16, 32, 64, 100, 255, 256, 257, 1000, 1024, 4097, 32_768, 65_535, 65_536])
def test_round_trip_and_exact_size(k):
    g = torch.Generator().manual_seed(k)
    rows, n = 7, 37
    codes = torch.randint(0, k, (rows, n), generator=g)
    codes[0, 0], codes[-1, -1] = k - 1, 0  # the extremes
    bits = bits_for(k)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (n * bits + 7) // 8) == (rows, packed_row_bytes(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n).long(), codes)


def test_bits_for():
    assert [bits_for(k) for k in (2, 3, 4, 5, 256, 257, 65_536)] == [1, 2, 2, 3, 8, 9, 16]


def test_code_out_of_range_rejected():
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_codes(torch.tensor([[0, 8]]), 3)


def test_unpack_wrong_size_rejected():
    with pytest.raises(ValueError, match="expected 4 for 8 codes of 4 bits"):
        unpack_codes(torch.zeros(2, 5, dtype=torch.uint8), 4, 8)
