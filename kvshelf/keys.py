"""Chunk keys: chained, stable, namespaced and multimodal-aware.

A prompt is cut into chunks of ``chunk_size`` tokens. Chunk ``i``'s key is
``blake3(key[i-1] || encode(chunk i))`` where the encoding holds the chunk's token
values *and*, for every multimodal item that overlaps the chunk, the item's full
identifier and the positions inside the item. Two different images therefore never
share a key, even though their placeholder tokens are identical; the identifier's
entropy is never truncated.

Beside the key, a second, independent chain (sha256 over the same encodings) gives
each chunk a :data:`CheckDigest`. An entry stores the digest it was made from and a
load compares it, so even a blake3 collision cannot serve another prompt's KV.

Besides full chunks, a plan has *cut* chunks: partial chunks that end where a
multimodal item starts or ends, or where the prompt ends. They let a prompt that
shares "system text + image" with an earlier one hit right up to the end of the image
although the question after it differs.

Keys are namespaced in two layers: the chain's root holds the request's ``cache_salt``;
:class:`Namespace` (model, KV layout, tensor-parallel rank/size, chunk size, entry
format) gives a 16-byte id that prefixes every :data:`StoreKey`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NewType

import numpy as np
from blake3 import blake3

ChunkKey = NewType("ChunkKey", bytes)  # 32 bytes: blake3 chain
CheckDigest = NewType("CheckDigest", bytes)  # 32 bytes: sha256 chain, verified on load
NamespaceId = NewType("NamespaceId", bytes)  # 16 bytes
StoreKey = NewType("StoreKey", bytes)  # NamespaceId || ChunkKey, 48 bytes

KEY_BYTES = 32
NAMESPACE_ID_BYTES = 16
STORE_KEY_BYTES = NAMESPACE_ID_BYTES + KEY_BYTES

_ROOT_TAG = b"kvshelf/chunk-chain/v1\x00"
_STATE_TAG = b"kvshelf/state/v1\x00"
_CHUNK_HEAD = struct.Struct("<II")  # tokens in chunk, media runs in chunk
_MEDIA_RUN = struct.Struct("<HIII")  # identifier bytes, start in item, offset in chunk, count
# A content hash: optionally "something:" in front (vLLM prefixes LoRA names), then
# at least 128 bits of hex. Request-scoped ids such as "renderer0-mm-7-image-0" fail.
_CONTENT_ID = re.compile(r"(?:[^:]{1,256}:)?[0-9a-fA-F]{32,1024}")


class UncacheableRequest(ValueError):
    """The request cannot be keyed safely (e.g. media without a content hash)."""


@dataclass(frozen=True, slots=True)
class MediaSpan:
    """One multimodal item's placeholder run in the prompt."""

    identifier: str  # vLLM's content hash of the image/audio/video
    offset: int  # first placeholder position in the prompt
    length: int  # number of placeholder positions

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class Namespace:
    """What must match for KV bytes to be reusable, besides the prompt."""

    model: str
    layout: str  # KV layout signature: layers, heads, head size, dtype, block layout
    tp_rank: int
    tp_size: int
    chunk_size: int
    format_version: int

    def id(self) -> NamespaceId:
        return NamespaceId(blake3(self.to_json().encode()).digest()[:NAMESPACE_ID_BYTES])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Chunk:
    """One cacheable piece of a prompt: tokens ``[start, end)``."""

    start: int
    end: int
    key: ChunkKey
    check: CheckDigest

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """Every key a prompt can be looked up or saved under."""

    num_tokens: int
    chunk_size: int
    full: tuple[Chunk, ...]  # full[i] covers [i * chunk_size, (i + 1) * chunk_size)
    cuts: tuple[Chunk, ...]  # partial chunks ending at cut points, sorted by end

    def cuts_from(self, chunk_index: int) -> list[Chunk]:
        """Partial chunks that start where full chunk ``chunk_index`` starts, longest first."""
        start = chunk_index * self.chunk_size
        return sorted((c for c in self.cuts if c.start == start), key=lambda c: -c.end)

    def all_chunks(self) -> tuple[Chunk, ...]:
        return self.full + self.cuts

    def chunk_ending_at(self, end: int) -> Chunk | None:
        """The full chunk or the cut that ends at token ``end``, if the plan has one."""
        if end % self.chunk_size == 0 and 0 < end // self.chunk_size <= len(self.full):
            return self.full[end // self.chunk_size - 1]
        return next((c for c in self.cuts if c.end == end), None)

    def chunks_up_to(self, end: int) -> list[Chunk]:
        """The chunks a prefix of ``end`` tokens is loaded from: full chunks up to ``end``,
        then the cut ending there (empty if ``end`` is no chunk end of the plan)."""
        chunks = list(self.full[: end // self.chunk_size])
        if end % self.chunk_size:
            cut = self.chunk_ending_at(end)
            if cut is None:
                return []
            chunks.append(cut)
        return chunks


def state_chunk(chunk: Chunk) -> Chunk:
    """The key under which the recurrent state (Mamba / linear attention) *after*
    ``chunk``'s last token is stored: derived from the chunk's own key and digest, so it
    names the whole prefix. Its ``start == end`` (a state covers no tokens)."""
    return Chunk(
        chunk.end,
        chunk.end,
        ChunkKey(blake3(_STATE_TAG + chunk.key).digest()),
        CheckDigest(hashlib.sha256(_STATE_TAG + chunk.check).digest()),
    )


def store_key(namespace_id: NamespaceId, key: ChunkKey) -> StoreKey:
    return StoreKey(namespace_id + key)


def is_content_identifier(identifier: str) -> bool:
    """True when ``identifier`` looks like a content hash, safe to key KV by."""
    return bool(_CONTENT_ID.fullmatch(identifier))


def plan_chunks(
    token_ids: Sequence[int] | np.ndarray,
    spans: Sequence[MediaSpan] = (),
    chunk_size: int = 256,
    salt: str = "",
    extra_cuts: Sequence[int] = (),
) -> ChunkPlan:
    """Keys for every full chunk and every cut chunk of a prompt.

    ``extra_cuts`` adds cut points besides the media boundaries and the prompt's end.
    Raises :class:`UncacheableRequest` when an item's identifier is not a content hash
    or the spans do not fit the prompt.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    tokens = np.asarray(token_ids, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
        raise ValueError("token ids must fit in 32 bits")
    token_bytes = tokens.astype("<u4").tobytes()
    n = int(tokens.size)
    spans = _checked_spans(spans, n)
    encoder = _ChunkEncoder(token_bytes, spans)

    root = _ROOT_TAG + salt.encode()
    key, check = blake3(root).digest(), hashlib.sha256(root).digest()
    full: list[Chunk] = []
    parents: list[tuple[bytes, bytes]] = []  # chain state at each full chunk's start
    for start in range(0, n - n % chunk_size, chunk_size):
        parents.append((key, check))
        chunk = _link(key, check, start, start + chunk_size, encoder)
        full.append(chunk)
        key, check = chunk.key, chunk.check
    parents.append((key, check))

    cuts = []
    for end in _cut_points(spans, n, chunk_size, extra_cuts):
        index = end // chunk_size
        parent_key, parent_check = parents[index]
        cuts.append(_link(parent_key, parent_check, index * chunk_size, end, encoder))
    return ChunkPlan(n, chunk_size, tuple(full), tuple(cuts))


def _checked_spans(spans: Sequence[MediaSpan], num_tokens: int) -> list[MediaSpan]:
    ordered = sorted(spans, key=lambda s: s.offset)
    previous_end = 0
    for span in ordered:
        if not is_content_identifier(span.identifier):
            raise UncacheableRequest(
                f"multimodal identifier {span.identifier!r} is not a content hash"
            )
        if span.length <= 0 or span.offset < previous_end or span.end > num_tokens:
            raise UncacheableRequest(
                f"multimodal span {span} does not fit a {num_tokens}-token prompt"
            )
        previous_end = span.end
    return ordered


def _cut_points(
    spans: list[MediaSpan], num_tokens: int, chunk_size: int, extra: Sequence[int] = ()
) -> list[int]:
    points = {num_tokens, *extra}
    for span in spans:
        points.update((span.offset, span.end))
    return sorted(p for p in points if 0 < p <= num_tokens and p % chunk_size)


def _link(parent_key: bytes, parent_check: bytes, start: int, end: int, encoder) -> Chunk:
    body = encoder.encode(start, end)
    return Chunk(
        start,
        end,
        ChunkKey(blake3(parent_key + body).digest()),
        CheckDigest(hashlib.sha256(parent_check + body).digest()),
    )


class _ChunkEncoder:
    """Injective byte encoding of a token range plus the media overlapping it."""

    def __init__(self, token_bytes: bytes, spans: list[MediaSpan]):
        self._tokens = token_bytes
        self._spans = spans
        self._span_ends = [s.end for s in spans]
        self._ids = [s.identifier.encode() for s in spans]

    def encode(self, start: int, end: int) -> bytes:
        runs = []
        i = bisect.bisect_right(self._span_ends, start)
        while i < len(self._spans) and self._spans[i].offset < end:
            span = self._spans[i]
            lo, hi = max(start, span.offset), min(end, span.end)
            ident = self._ids[i]
            runs.append(_MEDIA_RUN.pack(len(ident), lo - span.offset, lo - start, hi - lo) + ident)
            i += 1
        head = _CHUNK_HEAD.pack(end - start, len(runs))
        return head + self._tokens[4 * start : 4 * end] + b"".join(runs)
