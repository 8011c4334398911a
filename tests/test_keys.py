"""Chunk keys: golden values, the multimodal and prefix properties, stability, rejection."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from blake3 import blake3
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvshelf.keys import (
    KEY_BYTES,
    NAMESPACE_ID_BYTES,
    MediaSpan,
    Namespace,
    UncacheableRequest,
    is_content_identifier,
    plan_chunks,
    store_key,
)

IMAGE = hashlib.sha256(b"kvshelf golden image").hexdigest()
GOLDEN_TOKENS = list(range(1000, 1040))  # 2 full chunks of 16 and 8 tokens more
GOLDEN_SPAN = MediaSpan(IMAGE, offset=5, length=10)


def _hexes(chunks):
    return [(c.start, c.end, c.key.hex()) for c in chunks]


# -- golden values: a change here changes every key on every user's disk ---------------


def test_golden_text_only():
    plan = plan_chunks(GOLDEN_TOKENS, chunk_size=16)
    assert _hexes(plan.full) == [
        (0, 16, "dc8ce937a7f48a8605b8d1302d4ac25908e364cd11bf4cecd96f1e42b031f209"),
        (16, 32, "06924b02d4781ecb3ad3692028a30d030601a619d676066ba3380d6036288847"),
    ]
    assert _hexes(plan.cuts) == [
        (32, 40, "4d3f0d690f27a1726fe1d40bf7d9e45441c6ecbc5e51277268fb37d992d049f0"),
    ]
    assert plan.full[-1].check.hex() == (
        "a06b2cef539c883b46a9618ee7a245602ac2ac44c815c3c4c712e8505aa5b465"
    )


def test_golden_with_media():
    plan = plan_chunks(GOLDEN_TOKENS, [GOLDEN_SPAN], chunk_size=16)
    assert _hexes(plan.full) == [
        (0, 16, "f9f930ccccea9fd53d7b6d99b63884c0604889b5b615ec2b036e92f366a79da6"),
        (16, 32, "1eba1cf5a3a09248bb0ec0af0531ef859224bbac5d152b980559cbcb8bb5633b"),
    ]
    assert _hexes(plan.cuts) == [
        (0, 5, "779a45c5c6ded40f15ba870cd7f6506483ec9b8d46a48d976215c69565403c29"),
        (0, 15, "1a3dfd05481f77b71953bec02b548bc91a6054dcd48ef09fce7b078503d67cbc"),
        (32, 40, "0ba468b5130a6a33ff2b0f013635b0f5b1518a3f7c1591728567d64fa117bd08"),
    ]
    assert plan.full[-1].check.hex() == (
        "3d81f7e26a0cb56307cf8db6afe5cff4429869be421ba55475a94cac85baab48"
    )


def test_golden_with_media_and_salt():
    plan = plan_chunks(GOLDEN_TOKENS, [GOLDEN_SPAN], chunk_size=16, salt="tenant-a")
    assert _hexes(plan.full) == [
        (0, 16, "f9fa604f37660f359aa63ee69af1f624205f66347eabf51ca9c253ad02514645"),
        (16, 32, "f8124554244981119c6812ee8c8d2f9ebf43e9b719bd111f94f48aa6b15a523b"),
    ]
    assert _hexes(plan.cuts) == [
        (0, 5, "54cbb94f4bb7e5740762c7d1f0c4acd53a2c4af33bb4417b1ed24fa8f7d645c3"),
        (0, 15, "3f1cf8a4e80f32e7da68b1906b3b1ed04511d8d15410d1a2af5ece02876fb796"),
        (32, 40, "9f99f4e8c3aeb928f8777d41f80b7b57b3dd178f266f74965b511043c4dcff57"),
    ]
    assert plan.full[-1].check.hex() == (
        "a21b122ba615212bb70d938e1e740ede733c292ef936c6f0ed86dea4b566ade3"
    )


def test_golden_namespace_id():
    namespace = Namespace("llava-hf/llava-1.5-7b-hf", "L32xH32xD128:bfloat16:nhd", 0, 1, 256, 1)
    assert namespace.id().hex() == "3535313cd1ad989b96ddd0d96c773a3c"


def test_encoding_matches_the_documented_chain():
    """The first chunk's key and check, derived by hand from the module docstring."""
    root = b"kvshelf/chunk-chain/v1\x00"
    tokens = struct.pack("<16I", *GOLDEN_TOKENS[:16])
    ident = IMAGE.encode()
    # one media run: identifier length, start in item, offset in chunk, count
    body = struct.pack("<II", 16, 1) + tokens + struct.pack("<HIII", len(ident), 0, 5, 10) + ident
    first = plan_chunks(GOLDEN_TOKENS, [GOLDEN_SPAN], chunk_size=16).full[0]
    assert first.key == blake3(blake3(root).digest() + body).digest()
    assert first.check == hashlib.sha256(hashlib.sha256(root).digest() + body).digest()
    # the second chunk holds the rest of nothing: the item ended at 15
    second_body = struct.pack("<II", 16, 0) + struct.pack("<16I", *GOLDEN_TOKENS[16:32])
    second = plan_chunks(GOLDEN_TOKENS, [GOLDEN_SPAN], chunk_size=16).full[1]
    assert second.key == blake3(first.key + second_body).digest()


# -- stability --------------------------------------------------------------------------

_SUBPROCESS_KEYS = """
import json, sys
from kvshelf.keys import MediaSpan, Namespace, plan_chunks
spans = [MediaSpan(sys.argv[1], 5, 10)]
plan = plan_chunks(list(range(1000, 1040)), spans, chunk_size=16, salt="s")
ns = Namespace("m", "layout", 1, 2, 16, 1)
print(json.dumps({"keys": [c.key.hex() for c in plan.all_chunks()],
                  "checks": [c.check.hex() for c in plan.all_chunks()],
                  "namespace": ns.id().hex()}))
"""


@pytest.mark.parametrize("hash_seed", ["0", "123"])
def test_keys_are_stable_across_processes(hash_seed):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_KEYS, IMAGE],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(out.stdout)
    plan = plan_chunks(GOLDEN_TOKENS, [GOLDEN_SPAN], chunk_size=16, salt="s")
    assert theirs["keys"] == [c.key.hex() for c in plan.all_chunks()]
    assert theirs["checks"] == [c.check.hex() for c in plan.all_chunks()]
    assert theirs["namespace"] == Namespace("m", "layout", 1, 2, 16, 1).id().hex()


def test_numpy_and_list_tokens_give_the_same_keys():
    as_list = plan_chunks(GOLDEN_TOKENS, [GOLDEN_SPAN], chunk_size=16)
    as_array = plan_chunks(np.array(GOLDEN_TOKENS, dtype=np.int32), [GOLDEN_SPAN], chunk_size=16)
    assert as_list == as_array


# -- identifiers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "identifier",
    [
        hashlib.sha256(b"x").hexdigest(),
        hashlib.sha256(b"x").hexdigest().upper(),
        blake3(b"x").hexdigest(),
        "my-lora:" + hashlib.sha256(b"x").hexdigest(),
        "0" * 32,
    ],
)
def test_content_identifiers_are_accepted(identifier):
    assert is_content_identifier(identifier)
    plan_chunks(range(20), [MediaSpan(identifier, 2, 4)], chunk_size=8)


@pytest.mark.parametrize(
    "identifier",
    [
        "renderer0-mm-7-image-0",  # vLLM's request-scoped placeholder id
        "image-0",
        "",
        "abc123",  # hex, but far too short to be a content hash
        "lora:",
        "lora:not-hex-at-all-0000000000000000000000000000",
        "a:b:" + "0" * 64,  # only one prefix allowed
    ],
)
def test_request_scoped_identifiers_are_rejected(identifier):
    assert not is_content_identifier(identifier)
    with pytest.raises(UncacheableRequest, match="not a content hash"):
        plan_chunks(range(20), [MediaSpan(identifier, 2, 4)], chunk_size=8)


@pytest.mark.parametrize(
    "spans",
    [
        [MediaSpan(IMAGE, 15, 10)],  # runs past the prompt
        [MediaSpan(IMAGE, -1, 3)],
        [MediaSpan(IMAGE, 2, 0)],
        [MediaSpan(IMAGE, 2, 5), MediaSpan(IMAGE, 6, 2)],  # overlapping
    ],
)
def test_spans_that_do_not_fit_are_rejected(spans):
    with pytest.raises(UncacheableRequest, match="does not fit"):
        plan_chunks(range(20), spans, chunk_size=8)


def test_bad_tokens_and_chunk_size_are_errors():
    with pytest.raises(ValueError):
        plan_chunks([1, -2, 3], chunk_size=2)
    with pytest.raises(ValueError):
        plan_chunks([2**32], chunk_size=2)
    with pytest.raises(ValueError):
        plan_chunks([1, 2], chunk_size=0)


# -- cut chunks --------------------------------------------------------------------------


def test_cut_chunks_at_item_start_item_end_and_prompt_end():
    spans = [MediaSpan(IMAGE, 5, 10), MediaSpan("f" * 64, 20, 12)]  # second ends at 32
    plan = plan_chunks(range(40), spans, chunk_size=16)
    assert [(c.start, c.end) for c in plan.full] == [(0, 16), (16, 32)]
    # 5, 15: item 1; 20: item 2 start; 32 is a chunk boundary (no cut); 40: prompt end
    assert [(c.start, c.end) for c in plan.cuts] == [(0, 5), (0, 15), (16, 20), (32, 40)]
    assert [(c.start, c.end) for c in plan.cuts_from(0)] == [(0, 15), (0, 5)]  # longest first
    assert plan.cuts_from(1)[0].num_tokens == 4
    assert len({c.key for c in plan.all_chunks()}) == len(plan.all_chunks())


def test_a_cut_chains_from_the_full_chunk_before_it():
    """The cut (32, 40) of a 40-token prompt is what the 48-token prompt's chunk 2 would
    chain from: both share full chunks 0 and 1."""
    short = plan_chunks(range(40), chunk_size=16)
    longer = plan_chunks(range(48), chunk_size=16)
    assert short.full == longer.full[:2]
    assert short.cuts[0].key != longer.full[2].key  # different lengths, different keys


def test_empty_prompt_has_no_chunks():
    plan = plan_chunks([], chunk_size=16)
    assert plan.all_chunks() == ()


def test_placeholder_tokens_without_media_do_not_match_media():
    """Text that happens to use the placeholder token ids is not the image."""
    tokens = [7] * 5 + [32000] * 10 + [8] * 17
    text = plan_chunks(tokens, chunk_size=16)
    image = plan_chunks(tokens, [MediaSpan(IMAGE, 5, 10)], chunk_size=16)
    assert text.full[0].key != image.full[0].key
    assert text.full[1].key != image.full[1].key


def test_same_item_at_another_position_gives_other_keys():
    tokens = [7] * 32
    here = plan_chunks(tokens, [MediaSpan(IMAGE, 5, 10)], chunk_size=16)
    there = plan_chunks(tokens, [MediaSpan(IMAGE, 6, 10)], chunk_size=16)
    assert here.full[0].key != there.full[0].key


# -- salt and namespace -------------------------------------------------------------------


@settings(deadline=None)
@given(salt=st.text(min_size=1, max_size=20))
def test_salt_changes_every_key(salt):
    plain = plan_chunks(GOLDEN_TOKENS, [GOLDEN_SPAN], chunk_size=16)
    salted = plan_chunks(GOLDEN_TOKENS, [GOLDEN_SPAN], chunk_size=16, salt=salt)
    assert not {c.key for c in plain.all_chunks()} & {c.key for c in salted.all_chunks()}
    assert not {c.check for c in plain.all_chunks()} & {c.check for c in salted.all_chunks()}


_NAMESPACE = Namespace("llava", "L32xH32xD128:bfloat16", 0, 2, 256, 1)
_OTHER_VALUES = {
    "model": "llava-13b",
    "layout": "L32xH32xD128:float16",
    "tp_rank": 1,
    "tp_size": 4,
    "chunk_size": 512,
    "format_version": 2,
}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Namespace)])
def test_namespace_id_changes_with_every_field(field):
    assert set(_OTHER_VALUES) == {f.name for f in dataclasses.fields(Namespace)}
    changed = dataclasses.replace(_NAMESPACE, **{field: _OTHER_VALUES[field]})
    assert changed.id() != _NAMESPACE.id()
    assert len(changed.id()) == NAMESPACE_ID_BYTES


def test_store_key_is_namespace_then_chunk_key():
    chunk = plan_chunks(range(16), chunk_size=16).full[0]
    key = store_key(_NAMESPACE.id(), chunk.key)
    assert key == _NAMESPACE.id() + chunk.key
    assert len(chunk.key) == KEY_BYTES


# -- properties -------------------------------------------------------------------------

_IDS = [hashlib.sha256(bytes([i])).hexdigest() for i in range(6)]


@st.composite
def prompts(draw, min_items=0):
    """(tokens, spans, chunk_size): a prompt with non-overlapping media items."""
    chunk_size = draw(st.sampled_from([1, 2, 3, 4, 8]))
    num_tokens = draw(st.integers(0, 48))
    tokens = draw(st.lists(st.integers(0, 2**32 - 1), min_size=num_tokens, max_size=num_tokens))
    bounds = sorted(draw(st.sets(st.integers(0, num_tokens), max_size=8)))
    spans = []
    for lo, hi in zip(bounds[::2], bounds[1::2]):
        if hi > lo and draw(st.booleans()):
            spans.append(MediaSpan(draw(st.sampled_from(_IDS)), lo, hi - lo))
    assume(len(spans) >= min_items)
    return tokens, spans, chunk_size


def _by_range(plan):
    return {(c.start, c.end): c for c in plan.all_chunks()}


@settings(max_examples=300, deadline=None)
@given(prompts(min_items=1), st.data())
def test_different_media_give_disjoint_keys_from_the_first_differing_item(prompt, data):
    tokens, spans, chunk_size = prompt
    first = data.draw(st.integers(0, len(spans) - 1))
    changed = [
        dataclasses.replace(s, identifier=s.identifier[:-6] + "ffffff")
        if i >= first and data.draw(st.booleans()) or i == first
        else s
        for i, s in enumerate(spans)
    ]
    a = plan_chunks(tokens, spans, chunk_size)
    b = plan_chunks(tokens, changed, chunk_size)
    start = spans[first].offset
    b_keys = {c.key for c in b.all_chunks()}
    b_checks = {c.check for c in b.all_chunks()}
    b_chunks = _by_range(b)
    assert set(_by_range(a)) == set(b_chunks)  # same cut points: same placement
    for (lo, hi), chunk in _by_range(a).items():
        if hi <= start:  # entirely before the first differing item: shared
            assert b_chunks[lo, hi] == chunk
        else:  # touches it or comes after: nothing shared
            assert chunk.key not in b_keys
            assert chunk.check not in b_checks


def _clip(spans, num_tokens):
    return [
        dataclasses.replace(s, length=min(s.end, num_tokens) - s.offset)
        for s in spans
        if s.offset < num_tokens
    ]


@settings(max_examples=300, deadline=None)
@given(prompts(), st.data())
def test_prefix_property(prompt, data):
    """A prompt's chunks are those of any longer prompt that starts with it, even when
    the shorter prompt ends inside a media item."""
    tokens, spans, chunk_size = prompt
    cut = data.draw(st.integers(0, len(tokens)))
    longer = plan_chunks(tokens, spans, chunk_size)
    shorter = plan_chunks(tokens[:cut], _clip(spans, cut), chunk_size)
    assert shorter.full == longer.full[: len(shorter.full)]
    longer_chunks = _by_range(longer)
    for cut_chunk in shorter.cuts:
        same = longer_chunks.get((cut_chunk.start, cut_chunk.end))
        if same is not None:
            assert same == cut_chunk


@settings(max_examples=200, deadline=None)
@given(prompts())
def test_cut_points_are_item_bounds_and_prompt_end(prompt):
    tokens, spans, chunk_size = prompt
    plan = plan_chunks(tokens, spans, chunk_size)
    expected = {len(tokens)} | {s.offset for s in spans} | {s.end for s in spans}
    expected = {p for p in expected if 0 < p and p % chunk_size}
    assert [c.end for c in plan.cuts] == sorted(expected)
    for c in plan.cuts:
        assert c.start == c.end // chunk_size * chunk_size
    assert [c.start for c in plan.full] == list(range(0, len(plan.full) * chunk_size, chunk_size))
    assert len(plan.full) == len(tokens) // chunk_size


@settings(max_examples=100, deadline=None)
@given(prompts(), st.integers(0, 2**32 - 1))
def test_changing_one_token_changes_that_chunk_and_all_after(prompt, new_value):
    tokens, spans, chunk_size = prompt
    if not tokens:
        return
    position = new_value % len(tokens)
    changed = list(tokens)
    changed[position] = (tokens[position] + 1 + new_value % 7) % 2**32
    a = plan_chunks(tokens, spans, chunk_size)
    b = _by_range(plan_chunks(changed, spans, chunk_size))
    for (lo, hi), chunk in _by_range(a).items():
        assert (b[lo, hi] == chunk) == (hi <= position)
