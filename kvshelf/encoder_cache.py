"""Encoder-output cache: a vision / audio encoder's output kept under the media's content hash.

A KV hit covers only a shared prefix: the same image after another system prompt misses,
and vLLM runs the encoder again. This module keeps the encoder outputs themselves, one
entry per media item, in the same tiers and entry format as the KV cache
(:class:`~kvshelf.engine.CacheEngine`, :mod:`kvshelf.codec`). It imports neither vLLM nor
torch; :mod:`kvshelf.vllm.ec_connector` is the front.

Keys. An :class:`EncoderItem` names what an entry must hold: the request's ``cache_salt``,
vLLM's content hash of the item, and the output's layout (dtype, embeddings, width). Its
key is blake3 over those fields and its check digest an independent sha256 over the same
fields; a load compares the digest and the entry's dtype and shape, so an entry filed
under another item's key is never used. The engine's :class:`~kvshelf.keys.Namespace`
(:func:`encoder_namespace`) holds what must match besides: model, processor settings,
encoder dtype, tensor-parallel size, entry format.

Lookups. vLLM's scheduler decides whether the encoder runs for an item; the bytes and the
memory tier live with the workers. As for KV, the scheduler asks every worker over
:mod:`kvshelf.lookup`'s transport. The worker's :class:`EncoderLookup` reads and verifies
the entry and *holds* it (pinned in memory) until the load; only a held, verified entry is
a hit. The hold's owner is the item itself (:meth:`EncoderItem.owner`), so the worker can
check a held entry's layout without knowing the model's output widths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from blake3 import blake3

from kvshelf.codec import DTYPES, FORMAT_VERSION, Entry
from kvshelf.engine import CacheEngine
from kvshelf.keys import (
    CheckDigest,
    Chunk,
    ChunkKey,
    ChunkPlan,
    Namespace,
    UncacheableRequest,
    is_content_identifier,
)
from kvshelf.lookup import PENDING

logger = logging.getLogger(__name__)

UNREADABLE = -2  # a lookup answer: an entry exists but failed its checks or its read
ENCODER_LAYOUT = "encoder-output/v1"  # the namespace's layout field starts with this
_ITEM_TAG = b"kvshelf/encoder-output/v1\x00"
_ITEM_HEAD = struct.Struct("<IIIIH")  # salt bytes, identifier bytes, embeds, width, dtype bytes
ENCODER_CHUNK_SIZE = 1  # an encoder engine plans no chunks; fixed so its namespace stays put


@dataclass(frozen=True, slots=True)
class EncoderItem:
    """One media item's encoder output, as a cache entry must hold it."""

    identifier: str  # vLLM's content hash of the item (its mm_hash)
    modality: str  # "image", "audio", "video", ...: for counters and logs only
    num_embeds: int  # rows of the output: the item's embeddings
    width: int  # values per embedding
    dtype: str  # a codec dtype name, e.g. "bfloat16"
    salt: str = ""  # the request's cache_salt: tenants never share entries

    def __post_init__(self) -> None:
        texts = (self.identifier, self.modality, self.dtype, self.salt)
        counts = (self.num_embeds, self.width)
        well_typed = all(isinstance(t, str) for t in texts) and all(
            type(n) is int and n < 2**32
            for n in counts  # bool is an int: not here
        )
        if not well_typed:  # text from a lookup frame, not from vLLM
            raise UncacheableRequest(f"not an encoder item: {self!r}")
        if not is_content_identifier(self.identifier):
            raise UncacheableRequest(
                f"multimodal identifier {self.identifier!r} is not a content hash"
            )
        if self.num_embeds <= 0 or self.width <= 0:
            raise UncacheableRequest(f"no embeddings to cache ({self.num_embeds} x {self.width})")
        if self.dtype not in DTYPES:
            raise UncacheableRequest(f"encoder output dtype {self.dtype!r} has no entry format")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_embeds, self.width)

    def chunk(self) -> Chunk:
        """The entry's key and check digest: one chunk of ``num_embeds`` "tokens"."""
        body = self._encoded()
        return Chunk(
            0,
            self.num_embeds,
            ChunkKey(blake3(_ITEM_TAG + body).digest()),
            CheckDigest(hashlib.sha256(_ITEM_TAG + body).digest()),
        )

    def plan(self) -> ChunkPlan:
        """A plan whose only chunk is this item: a cut with no full chunk before it, the
        shape :meth:`CacheEngine.fetch_plan` and the lookup transport take."""
        return ChunkPlan(self.num_embeds, self.num_embeds + 1, (), (self.chunk(),))

    def owner(self) -> str:
        """The hold's owner on the worker: the item itself, as text."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_owner(cls, owner: str) -> EncoderItem:
        """Raises ``ValueError`` (or its :class:`UncacheableRequest`) for text no item made."""
        fields = json.loads(owner)
        if not isinstance(fields, dict) or set(fields) != set(cls.__dataclass_fields__):
            raise ValueError(f"not an encoder item: {owner[:80]!r}")
        return cls(**fields)

    def _encoded(self) -> bytes:
        salt, ident, dtype = self.salt.encode(), self.identifier.encode(), self.dtype.encode()
        head = _ITEM_HEAD.pack(len(salt), len(ident), self.num_embeds, self.width, len(dtype))
        return head + salt + ident + dtype


def encoder_namespace(model: str, settings: Mapping[str, Any], tp_size: int) -> Namespace:
    """The namespace of one model's encoder outputs. ``settings`` holds what else changes
    the outputs (processor settings, dtype, overrides); every tensor-parallel rank holds
    the same output, so there is one namespace for all ranks."""
    layout = f"{ENCODER_LAYOUT} " + json.dumps(
        dict(settings), sort_keys=True, separators=(",", ":"), default=str
    )
    return Namespace(model, layout, 0, tp_size, ENCODER_CHUNK_SIZE, FORMAT_VERSION)


@dataclass
class _Job:
    future: Future = field(init=False)
    done_at: float | None = None  # when a lookup first saw it answered
    released: bool = False


class EncoderLookup:
    """The worker's side of encoder lookups. Thread-safe.

    :meth:`lookup` has :meth:`kvshelf.lookup.WorkerLookup.lookup`'s shape, so a
    :class:`~kvshelf.lookup.LookupServer` serves it. Answers: the item's embeddings (held
    for the load), 0 (absent), :data:`UNREADABLE` (present, but corrupt, unverifiable or
    unreadable: removed where it was corrupt) or :data:`~kvshelf.lookup.PENDING`. A hit is
    remembered until :meth:`release` or until it is ``refresh_s`` old: then a lookup reads
    it again, renewing the hold (the scheduler asks again after half the hold timeout, so
    a hold it counts on never expires). A miss is not remembered.
    """

    def __init__(self, engine: CacheEngine, threads: int = 2):
        self.engine = engine
        self.refresh_s = engine.config.hold_timeout_s / 4
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvshelf-encoder-read")
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()

    def lookup(
        self, req_id: str, plan: ChunkPlan, wait_s: float, seconds_per_token: float | None = None
    ) -> int:
        """``req_id`` is the item's :meth:`EncoderItem.owner` and ``plan`` its
        :meth:`~EncoderItem.plan`. ``seconds_per_token`` is ignored: an encoder entry is
        always worth loading."""
        try:
            item = EncoderItem.from_owner(req_id)
        except ValueError as exc:
            logger.warning("encoder lookup for something that is not an item: %s", exc)
            return 0
        if plan != item.plan():
            return 0
        now = time.monotonic()
        with self._lock:
            job = self._jobs.get(req_id)
            done_at = job.done_at if job is not None else None
            if job is None or (done_at is not None and now - done_at > self.refresh_s):
                job = _Job()
                job.future = self._pool.submit(self._read, req_id, item, job)
                self._jobs[req_id] = job
        try:
            answer = job.future.result(timeout=wait_s)
        except FutureTimeout:
            return PENDING
        with self._lock:
            if answer <= 0 and self._jobs.get(req_id) is job:
                del self._jobs[req_id]  # a miss: the next lookup reads again
            elif job.done_at is None:
                job.done_at = now
        return answer

    def take(self, owner: str) -> Entry | None:
        """The entry held for ``owner``, read again if the hold is gone; ``None`` if it
        cannot be had. The hold stays until :meth:`release`."""
        hold = self.engine.hold(owner)
        if hold is not None and hold.items:
            return hold.items[0].entry
        try:
            item = EncoderItem.from_owner(owner)
        except ValueError:
            return None
        if self._fetch(owner, item) <= 0:
            return None
        hold = self.engine.hold(owner)
        return hold.items[0].entry if hold is not None and hold.items else None

    def release(self, owner: str) -> None:
        """Forget ``owner``'s lookup and unpin what it held."""
        with self._lock:
            job = self._jobs.pop(owner, None)
            if job is not None:
                job.released = True
        self.engine.release(owner)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, owner: str, item: EncoderItem, job: _Job) -> int:
        answer = self._fetch(owner, item)
        with self._lock:
            orphan = job.released  # released while it was read: nothing waits for it
        if orphan:
            self.engine.release(owner)
        return answer

    def _fetch(self, owner: str, item: EncoderItem) -> int:
        """Read, verify and hold ``item`` under ``owner``; the lookup answer."""
        plan = item.plan()
        if not self.engine.locate(plan):
            self.engine.release(owner)
            return 0
        hold = self.engine.fetch_plan(plan, owner)
        if not hold.num_tokens:  # checksum, check digest, embeddings
            hold.release()
            return UNREADABLE
        entry = hold.items[0].entry
        if not _layout_matches(entry, item):
            logger.warning(
                "encoder entry %s holds %s%s, expected %s%s; removed",
                entry.key.hex(),
                entry.dtype,
                list(entry.shape),
                item.dtype,
                list(item.shape),
            )
            hold.release()
            self.engine.store.delete([entry.key])
            return UNREADABLE
        return item.num_embeds


def _layout_matches(entry: Entry, item: EncoderItem) -> bool:
    return entry.dtype == item.dtype and tuple(entry.shape) == item.shape


class Lookup(Protocol):
    """One worker, as the scheduler reaches it (:class:`kvshelf.lookup.LookupClient`)."""

    def lookup(
        self, req_id: str, plan: ChunkPlan, wait_s: float, seconds_per_token: float | None = None
    ) -> int: ...


@dataclass
class EncoderStep:
    """What the workers do in one step: the connector's metadata. Plain values."""

    loads: list[str] = field(default_factory=list)  # owners: into vLLM's encoder cache, released
    saves: dict[str, str] = field(default_factory=dict)  # identifier -> owner: store once encoded
    releases: list[str] = field(default_factory=list)  # owners held for nothing


@dataclass
class _Ready:
    """A hit every worker holds, not loaded yet."""

    asked_at: float
    users: set[str] = field(default_factory=set)  # requests that looked it up


@dataclass
class _Request:
    req_id: str
    items: dict[int, EncoderItem | None]  # vLLM's index -> item (None: not cacheable)
    answers: dict[str, int] = field(default_factory=dict)  # owner -> final lookup answer


class EncoderBook:
    """The scheduler's side: which items to look up, which hits to load, what to store.

    Not thread-safe: vLLM's scheduler calls it from one thread, in this order per request
    and step: :meth:`prepare`, :meth:`has` for each item the encoder would otherwise
    run, :meth:`allocated` for each item vLLM makes room for; :meth:`step` once per step;
    :meth:`finished` once per request. Items vLLM's own encoder cache holds
    (:meth:`allocated` and not yet freed) are not looked up.
    """

    def __init__(
        self,
        workers: Sequence[Lookup],
        wait_s: float,
        refresh_s: float,
        load: bool = True,
        save: bool = True,
    ):
        self.workers = list(workers)
        self.wait_s = wait_s
        self.refresh_s = refresh_s  # ask again for a hit this old: the worker reads it anew
        self.load = load
        self.save = save
        self.counts: Counter[tuple[str, str]] = Counter()  # (counter, modality) -> increments
        self._requests: dict[str, _Request] = {}
        self._current: _Request | None = None  # the request prepare() saw last
        self._ready: dict[str, _Ready] = {}  # owner -> hit held by every worker
        self._resident: set[str] = set()  # identifiers in vLLM's own encoder cache
        self._step = EncoderStep()

    def prepare(
        self, req_id: str, items: Mapping[int, EncoderItem | None], needed: Sequence[int]
    ) -> bool:
        """Look up the ``needed`` items of a request (``items`` is read on first sight);
        ``False`` while a worker is still reading one (vLLM asks again next step)."""
        state = self._requests.setdefault(req_id, _Request(req_id, dict(items)))
        self._current = state
        if not self.load:
            return True
        now = time.monotonic()
        asks = []
        for index in needed:
            item = state.items.get(index)
            if item is None or item.identifier in self._resident:
                continue
            owner = item.owner()
            ready = self._ready.get(owner)
            if owner in state.answers and (ready is None or now - ready.asked_at < self.refresh_s):
                continue
            asks.append(item)
        answers = {item: self._ask(item, 0.0) for item in asks}  # every read starts at once
        for item in [i for i, answer in answers.items() if answer == PENDING]:
            answers[item] = self._ask(item, self.wait_s)
        for item, answer in answers.items():
            if answer != PENDING:
                self._settle(state, item, answer, now)
        return PENDING not in answers.values()

    def knows(self, req_id: str) -> bool:
        """Whether :meth:`prepare` has seen the request (its items are read once)."""
        return req_id in self._requests

    def has(self, identifier: str) -> bool:
        """Whether the request :meth:`prepare` saw last has ``identifier`` held for it.
        vLLM asks only for items its own encoder cache lacks: one :meth:`prepare` took for
        resident (it was dropped, or the cache was reset) is looked up now, within
        ``wait_s``."""
        state = self._current
        if state is None or not self.load:
            return False
        item = next(
            (i for i in state.items.values() if i is not None and i.identifier == identifier),
            None,
        )
        if item is None:
            return False
        owner = item.owner()
        if owner not in state.answers:
            self._resident.discard(identifier)
            answer = self._ask(item, self.wait_s)
            if answer != PENDING:
                self._settle(state, item, answer, time.monotonic())
        return owner in self._ready and state.answers.get(owner, 0) > 0

    def allocated(self, req_id: str, index: int, identifier: str) -> str:
        """vLLM made room for item ``index``: a load if it is held, else a save once the
        encoder has run. Returns what happened: "hit", "miss", "unreadable", "unasked"
        (vLLM held it when it was looked up) or "uncacheable"."""
        self._resident.add(identifier)
        state = self._requests.get(req_id)
        item = state.items.get(index) if state is not None else None
        if state is None or item is None:
            return "uncacheable"
        owner = item.owner()
        answer = state.answers.get(owner)
        if answer is not None and answer > 0 and self._ready.pop(owner, None) is not None:
            self._step.loads.append(owner)
            self.counts["hits", item.modality] += 1
            del state.answers[owner]  # used up: asked again if needed again (a preemption)
            return "hit"
        if self.save:
            self._step.saves[identifier] = owner
        if answer is None:
            return "unasked"
        return "unreadable" if answer == UNREADABLE else "miss"

    def step(self, freed: Sequence[str] = ()) -> EncoderStep:
        """This step's loads, saves and releases; ``freed``: identifiers vLLM's encoder
        cache dropped this step."""
        self._resident.difference_update(freed)
        step, self._step = self._step, EncoderStep()
        return step

    def finished(self, req_id: str) -> None:
        """Release what only this request looked up and did not load."""
        state = self._requests.pop(req_id, None)
        if state is None:
            return
        if self._current is state:
            self._current = None
        for owner in state.answers:
            ready = self._ready.get(owner)
            if ready is None:
                continue
            ready.users.discard(req_id)
            if not ready.users:
                del self._ready[owner]
                self._step.releases.append(owner)

    def _ask(self, item: EncoderItem, wait_s: float) -> int:
        """Every worker's answer for ``item``: a hit only if all hold it."""
        owner, plan = item.owner(), item.plan()
        answers = [worker.lookup(owner, plan, wait_s) for worker in self.workers]
        if PENDING in answers:
            return PENDING
        if UNREADABLE in answers:
            return UNREADABLE
        return min(answers, default=0)

    def _settle(self, state: _Request, item: EncoderItem, answer: int, now: float) -> None:
        owner = item.owner()
        first = owner not in state.answers
        state.answers[owner] = answer
        if answer > 0:
            ready = self._ready.setdefault(owner, _Ready(now))
            ready.asked_at = now
            ready.users.add(state.req_id)
        else:
            if self._ready.pop(owner, None) is not None or len(self.workers) > 1:
                self._step.releases.append(owner)  # some worker may hold it: let go
            if first:
                self.counts["misses", item.modality] += 1
                if answer == UNREADABLE:
                    self.counts["corrupt", item.modality] += 1
        if first:
            self.counts["lookups", item.modality] += 1
