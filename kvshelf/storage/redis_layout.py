"""How the remote tier lays entries out in Redis: keys, heads and payload parts.

An entry is a small *head* and its payload in *parts*, all under one cluster hash tag so
that they live in one slot::

    kvshelf:{<namespace id hex>:<chunk key hex>}:h                 head
    kvshelf:{<namespace id hex>:<chunk key hex>}:<nonce hex>:<i>   payload part i

The head is the 256-byte codec header, then a trailer: the part size, the writer's
random nonce and an xxh3-64 of both. A part holds at most ``part_bytes``, so no value
comes near Redis' 512 MB bulk limit whatever the chunk size. With a TTL, parts live a
minute longer than their head, so a visible head has its parts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from kvshelf.codec import HEADER_BYTES, CorruptEntry, Entry, Header, decode_header, encode_header
from kvshelf.keys import NAMESPACE_ID_BYTES, StoreKey

KEY_PREFIX = "kvshelf"
MAX_PART_BYTES = 512 * 2**20  # Redis' default proto-max-bulk-len
_TRAILER = struct.Struct("<4sIQ8s")  # magic, trailer version, part bytes, writer nonce
_TRAILER_MAGIC = b"KVRH"
_TRAILER_VERSION = 1
_SUM = struct.Struct("<Q")  # xxh3-64 of codec header + trailer
HEAD_BYTES = HEADER_BYTES + _TRAILER.size + _SUM.size
NONCE_BYTES = 8
PART_TTL_SLACK_S = 60


def key_tag(key: StoreKey) -> str:
    namespace, chunk = key[:NAMESPACE_ID_BYTES].hex(), key[NAMESPACE_ID_BYTES:].hex()
    return f"{KEY_PREFIX}:{{{namespace}:{chunk}}}"


def head_key(key: StoreKey) -> bytes:
    """The Redis key of an entry's head."""
    return f"{key_tag(key)}:h".encode()


def part_key(key: StoreKey, nonce: bytes, index: int) -> bytes:
    return f"{key_tag(key)}:{nonce.hex()}:{index}".encode()


@dataclass(frozen=True, slots=True)
class RemoteHead:
    """A decoded head: the entry's header and where its payload parts are."""

    header: Header
    part_bytes: int
    nonce: bytes

    def parts(self) -> list[tuple[bytes, int, int]]:
        """(Redis key, payload offset, bytes) of every part, in order."""
        return part_spans(self.header.key, self.nonce, self.header.payload_bytes, self.part_bytes)


def part_spans(key: StoreKey, nonce: bytes, total: int, step: int) -> list[tuple[bytes, int, int]]:
    return [
        (part_key(key, nonce, i), offset, min(step, total - offset))
        for i, offset in enumerate(range(0, total, step))
    ]


def part_commands(entry: Entry, nonce: bytes, part_bytes: int, ttl_s: int | None) -> list[tuple]:
    """The ``SET`` of each of the entry's payload parts, stored under ``nonce``."""
    payload = entry.payload
    payload = payload.cast("B") if payload.format != "B" else payload
    ttl = () if ttl_s is None else ("EX", ttl_s + PART_TTL_SLACK_S)
    spans = part_spans(entry.key, nonce, entry.nbytes, part_bytes)
    return [("SET", key, payload[offset : offset + n], *ttl) for key, offset, n in spans]


def head_command(entry: Entry, nonce: bytes, part_bytes: int, ttl_s: int | None) -> tuple:
    """The head's ``SET NX``; it carries the payload checksum, computed here."""
    ttl = () if ttl_s is None else ("EX", ttl_s)
    return ("SET", head_key(entry.key), encode_head(entry, part_bytes, nonce), "NX", *ttl)


def encode_head(entry: Entry, part_bytes: int, nonce: bytes) -> bytes:
    body = encode_header(entry) + _TRAILER.pack(_TRAILER_MAGIC, _TRAILER_VERSION, part_bytes, nonce)
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


def decode_head(data: bytes) -> RemoteHead:
    """Parse and check a head; raises :class:`CorruptEntry`."""
    if len(data) != HEAD_BYTES:
        raise CorruptEntry(f"head is {len(data)} bytes, expected {HEAD_BYTES}")
    body = data[: HEAD_BYTES - _SUM.size]
    (stored_sum,) = _SUM.unpack_from(data, len(body))
    if xxhash.xxh3_64_intdigest(body) != stored_sum:
        raise CorruptEntry("head checksum mismatch")
    magic, version, part_bytes, nonce = _TRAILER.unpack_from(data, HEADER_BYTES)
    if magic != _TRAILER_MAGIC or version != _TRAILER_VERSION:
        raise CorruptEntry(f"head trailer {magic!r} v{version}, this kvshelf reads v1")
    if not 0 < part_bytes <= MAX_PART_BYTES:
        raise CorruptEntry(f"bad part size {part_bytes}")
    return RemoteHead(decode_header(data[:HEADER_BYTES]), part_bytes, nonce)


def decode_or_none(raw: bytes) -> RemoteHead | None:
    try:
        return decode_head(raw)
    except CorruptEntry:
        return None
