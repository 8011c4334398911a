"""Versioned binary entry format: a fixed 256-byte header, then the raw payload.

Header, little-endian (format version 1)::

    offset size  field
         0    4  magic b"KVSH"
         4    2  format version (1)
         6    1  dtype code (index into DTYPES)
         7    1  number of dimensions (<= 8)
         8    4  tokens covered by the entry
        12    8  payload bytes
        20   16  namespace id
        36   32  chunk key
        68   32  check digest (sha256 chain, compared on load)
       100   16  xxh3-128 of the payload
       116   64  shape, 8 x uint64 (unused dimensions are 0)
       180    8  xxh3-64 of bytes 0..180
       188   68  zero padding (the payload starts 256-byte aligned)

No pickle: every field is a fixed-width number or raw bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Protocol

import xxhash

from kvshelf.keys import (
    KEY_BYTES,
    NAMESPACE_ID_BYTES,
    CheckDigest,
    StoreKey,
)

FORMAT_VERSION = 1
MAGIC = b"KVSH"
HEADER_BYTES = 256
MAX_DIMS = 8
DIGEST_PIECE = 4 << 20
DTYPES = (
    "uint8",
    "int8",
    "int16",
    "int32",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
)
ITEM_BYTES = {
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
_FIXED = struct.Struct(f"<4sHBBIQ{NAMESPACE_ID_BYTES}s{KEY_BYTES}s32s16s{MAX_DIMS}Q")
_SUM = struct.Struct("<Q")
assert _FIXED.size == 180 and _FIXED.size + _SUM.size <= HEADER_BYTES
_PADDING = bytes(HEADER_BYTES - _FIXED.size - _SUM.size)


class PayloadOwner(Protocol):
    """The allocator buffer behind an entry's payload (a
    :class:`~kvshelf.storage.base.HostBlock`): the memory tier frees it on eviction, and a
    GPU copy reads its ``handle`` when that is a pinned tensor rather than the view."""

    @property
    def view(self) -> memoryview: ...

    @property
    def handle(self) -> object: ...  # the allocator's own bookkeeping, if any


class CorruptEntry(ValueError):
    """Bytes that do not form a valid entry: wrong magic, version, checksum or size."""


@dataclass(slots=True, eq=False)
class Entry:
    """One chunk's KV bytes and what they were made from.

    ``payload`` is a read-only-by-convention view; ``owner`` is the buffer that backs it
    when it came from an allocator (the memory tier frees it on eviction).
    """

    key: StoreKey
    check: CheckDigest
    num_tokens: int
    dtype: str
    shape: tuple[int, ...]
    payload: memoryview
    owner: PayloadOwner | None = None
    _digest: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in ITEM_BYTES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; use one of {DTYPES}")
        if len(self.shape) > MAX_DIMS:
            raise ValueError(f"at most {MAX_DIMS} dimensions, got shape {self.shape}")
        if payload_bytes(self.dtype, self.shape) != self.payload.nbytes:
            raise ValueError(
                f"payload holds {self.payload.nbytes} bytes but {self.dtype}{list(self.shape)}"
                f" needs {payload_bytes(self.dtype, self.shape)}"
            )

    @property
    def nbytes(self) -> int:
        return self.payload.nbytes

    def payload_digest(self) -> bytes:
        if self._digest is None:
            self._digest = digest(self.payload)
        return self._digest


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded header; the payload is read and checked separately."""

    key: StoreKey
    check: CheckDigest
    num_tokens: int
    dtype: str
    shape: tuple[int, ...]
    payload_bytes: int
    payload_digest: bytes


def digest(payload: memoryview) -> bytes:
    """xxh3-128 of a payload, hashed in pieces: the hash holds the GIL while it runs, and
    pieces keep a background save from stalling the serving thread for long."""
    view = memoryview(payload).cast("B")
    if view.nbytes <= DIGEST_PIECE:
        return xxhash.xxh3_128_digest(view)
    hasher = xxhash.xxh3_128()
    for start in range(0, view.nbytes, DIGEST_PIECE):
        hasher.update(view[start : start + DIGEST_PIECE])
    return hasher.digest()


def payload_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return ITEM_BYTES[dtype] * math.prod(shape)


def encode_header(entry: Entry) -> bytes:
    namespace_id, key = entry.key[:NAMESPACE_ID_BYTES], entry.key[NAMESPACE_ID_BYTES:]
    shape = tuple(entry.shape) + (0,) * (MAX_DIMS - len(entry.shape))
    fixed = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        DTYPES.index(entry.dtype),
        len(entry.shape),
        entry.num_tokens,
        entry.nbytes,
        namespace_id,
        key,
        entry.check,
        entry.payload_digest(),
        *shape,
    )
    head = fixed + _SUM.pack(xxhash.xxh3_64_intdigest(fixed))
    return head + bytes(HEADER_BYTES - len(head))


def decode_header(data: bytes | memoryview) -> Header:
    """Parse and check a header; raises :class:`CorruptEntry`."""
    if len(data) < HEADER_BYTES:
        raise CorruptEntry(f"header is {len(data)} bytes, expected {HEADER_BYTES}")
    fixed = bytes(data[: _FIXED.size])
    (stored_sum,) = _SUM.unpack_from(data, _FIXED.size)
    if xxhash.xxh3_64_intdigest(fixed) != stored_sum:
        raise CorruptEntry("header checksum mismatch")
    # The padding is outside the checksum, so check it is still zero.
    if bytes(data[_FIXED.size + _SUM.size : HEADER_BYTES]) != _PADDING:
        raise CorruptEntry("header padding is not zero")
    magic, version, dtype_code, ndim, num_tokens, nbytes, ns, key, check, digest, *dims = (
        _FIXED.unpack(fixed)
    )
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"entry format {version}, this kvshelf reads {FORMAT_VERSION}")
    if dtype_code >= len(DTYPES) or ndim > MAX_DIMS:
        raise CorruptEntry(f"bad dtype code {dtype_code} or ndim {ndim}")
    dtype, shape = DTYPES[dtype_code], tuple(dims[:ndim])
    if payload_bytes(dtype, shape) != nbytes:
        raise CorruptEntry(f"shape {shape} of {dtype} does not match {nbytes} payload bytes")
    return Header(StoreKey(ns + key), CheckDigest(check), num_tokens, dtype, shape, nbytes, digest)


def check_payload(header: Header, payload: memoryview) -> None:
    """Raise :class:`CorruptEntry` unless ``payload`` is what ``header`` describes."""
    if payload.nbytes != header.payload_bytes:
        raise CorruptEntry(f"payload is {payload.nbytes} bytes, expected {header.payload_bytes}")
    if digest(payload) != header.payload_digest:
        raise CorruptEntry("payload checksum mismatch")


def entry_from(header: Header, payload: memoryview, owner: PayloadOwner | None = None) -> Entry:
    """An :class:`Entry` for a payload already checked against its header."""
    return Entry(
        header.key,
        header.check,
        header.num_tokens,
        header.dtype,
        header.shape,
        payload,
        owner,
        header.payload_digest,
    )


def encode(entry: Entry) -> bytes:
    """Header and payload as one bytes object (tests and small remote values)."""
    return encode_header(entry) + entry.payload.tobytes()


def decode(data: bytes | memoryview) -> Entry:
    """Parse and fully check one encoded entry; raises :class:`CorruptEntry`."""
    view = memoryview(data)
    header = decode_header(view)
    payload = view[HEADER_BYTES:]
    check_payload(header, payload)
    return entry_from(header, payload)
