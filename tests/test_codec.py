"""The entry format: golden bytes of version 1, and every corruption is caught."""

from __future__ import annotations

import struct

import pytest
import xxhash

from kvshelf import codec
from kvshelf.codec import HEADER_BYTES, CorruptEntry, Entry

# Format version 1 of a 12-byte bfloat16[2, 3] entry. If this test fails, the on-disk
# and on-wire format changed: bump FORMAT_VERSION instead of editing the literal.
GOLDEN_V1 = bytes.fromhex(
    "4b56534801000502030000000c00000000000000000102030405060708090a0b"
    "0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b"
    "2c2d2e2f6465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
    "8081828307da5641c80cfe74c783acb89272e8df020000000000000003000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000073ac90c81f31028000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "a0a1a2a3a4a5a6a7a8a9aaab"
)


def golden_entry() -> Entry:
    return Entry(
        key=bytes(range(48)),
        check=bytes(range(100, 132)),
        num_tokens=3,
        dtype="bfloat16",
        shape=(2, 3),
        payload=memoryview(bytes(range(0xA0, 0xAC))),
    )


def test_golden_bytes_v1():
    assert codec.FORMAT_VERSION == 1
    assert codec.encode(golden_entry()) == GOLDEN_V1


def test_golden_bytes_follow_the_documented_layout():
    data = GOLDEN_V1
    assert data[0:4] == b"KVSH"
    assert struct.unpack_from("<HBBIQ", data, 4) == (1, codec.DTYPES.index("bfloat16"), 2, 3, 12)
    assert data[20:68] == bytes(range(48))  # namespace id, then chunk key
    assert data[68:100] == bytes(range(100, 132))
    assert data[100:116] == xxhash.xxh3_128_digest(bytes(range(0xA0, 0xAC)))
    assert struct.unpack_from("<8Q", data, 116) == (2, 3, 0, 0, 0, 0, 0, 0)
    assert struct.unpack_from("<Q", data, 180)[0] == xxhash.xxh3_64_intdigest(data[:180])
    assert data[188:HEADER_BYTES] == bytes(68)
    assert data[HEADER_BYTES:] == bytes(range(0xA0, 0xAC))


def test_golden_bytes_decode():
    entry = codec.decode(GOLDEN_V1)
    expected = golden_entry()
    assert entry.key == expected.key
    assert entry.check == expected.check
    assert entry.num_tokens == 3
    assert entry.dtype == "bfloat16"
    assert entry.shape == (2, 3)
    assert entry.payload.tobytes() == expected.payload.tobytes()
    assert entry.payload_digest() == expected.payload_digest()


@pytest.mark.parametrize("dtype", codec.DTYPES)
def test_round_trip_every_dtype(dtype):
    shape = (4, 1, 3)
    payload = bytes(i % 251 for i in range(codec.payload_bytes(dtype, shape)))
    entry = Entry(bytes(48), bytes(32), 7, dtype, shape, memoryview(payload))
    back = codec.decode(codec.encode(entry))
    assert (back.dtype, back.shape, back.payload.tobytes()) == (dtype, shape, payload)


def test_split_decode_path_matches_decode():
    """The disk tier reads the header, then the payload: the same checks apply."""
    header = codec.decode_header(GOLDEN_V1[:HEADER_BYTES])
    payload = memoryview(GOLDEN_V1)[HEADER_BYTES:]
    codec.check_payload(header, payload)
    entry = codec.entry_from(header, payload)
    assert codec.encode(entry) == GOLDEN_V1


# -- corruption -------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_single_byte_flip_is_corrupt(mask):
    for position in range(len(GOLDEN_V1)):
        data = bytearray(GOLDEN_V1)
        data[position] ^= mask
        with pytest.raises(CorruptEntry):
            codec.decode(bytes(data))


def test_header_padding_flip_is_corrupt():
    """Regression: the 68 padding bytes are outside the header checksum, and a flip
    there used to decode as a valid entry."""
    data = bytearray(GOLDEN_V1)
    data[200] ^= 0x10
    with pytest.raises(CorruptEntry, match="padding"):
        codec.decode_header(bytes(data[:HEADER_BYTES]))


def test_truncated_data_is_corrupt():
    for length in range(len(GOLDEN_V1)):
        with pytest.raises(CorruptEntry):
            codec.decode(GOLDEN_V1[:length])


def test_trailing_bytes_are_corrupt():
    with pytest.raises(CorruptEntry, match="payload is 13 bytes"):
        codec.decode(GOLDEN_V1 + b"\0")


def _with_fixed_field(fmt: str, offset: int, value) -> bytes:
    """GOLDEN_V1 with one header field changed and the header checksum recomputed, so
    only the field's own check can catch it."""
    data = bytearray(GOLDEN_V1)
    struct.pack_into(fmt, data, offset, value)
    struct.pack_into("<Q", data, 180, xxhash.xxh3_64_intdigest(bytes(data[:180])))
    return bytes(data)


def test_wrong_version_is_corrupt():
    with pytest.raises(CorruptEntry, match="entry format 2"):
        codec.decode(_with_fixed_field("<H", 4, 2))
    with pytest.raises(CorruptEntry, match="entry format 0"):
        codec.decode(_with_fixed_field("<H", 4, 0))


def test_wrong_magic_is_corrupt():
    with pytest.raises(CorruptEntry, match="magic"):
        codec.decode(_with_fixed_field("<4s", 0, b"LMCA"))


def test_unknown_dtype_or_too_many_dims_is_corrupt():
    with pytest.raises(CorruptEntry, match="dtype code"):
        codec.decode(_with_fixed_field("<B", 6, len(codec.DTYPES)))
    with pytest.raises(CorruptEntry, match="ndim"):
        codec.decode(_with_fixed_field("<B", 7, codec.MAX_DIMS + 1))


def test_shape_that_does_not_match_the_size_is_corrupt():
    with pytest.raises(CorruptEntry, match="does not match"):
        codec.decode(_with_fixed_field("<Q", 116, 3))  # 3 x 3 bf16 != 12 bytes


def test_payload_digest_mismatch_is_corrupt_even_with_a_valid_header():
    data = bytearray(GOLDEN_V1)
    data[-1] ^= 1
    header = codec.decode_header(bytes(data[:HEADER_BYTES]))  # the header is fine
    with pytest.raises(CorruptEntry, match="payload checksum"):
        codec.check_payload(header, memoryview(data)[HEADER_BYTES:])


# -- Entry validation -------------------------------------------------------------------


def test_entry_rejects_a_payload_of_the_wrong_size():
    with pytest.raises(ValueError, match="needs 12"):
        Entry(bytes(48), bytes(32), 3, "bfloat16", (2, 3), memoryview(bytes(11)))


def test_entry_rejects_unknown_dtype_and_too_many_dims():
    with pytest.raises(ValueError, match="unsupported dtype"):
        Entry(bytes(48), bytes(32), 1, "complex64", (1,), memoryview(bytes(8)))
    with pytest.raises(ValueError, match="at most 8"):
        Entry(bytes(48), bytes(32), 1, "uint8", (1,) * 9, memoryview(bytes(1)))
