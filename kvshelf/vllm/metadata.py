"""What the scheduler side tells the worker side each step (vLLM carries it between
processes): the loads and saves of the step and the holds to drop."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvshelf.keys import Chunk

BlockIds = tuple[list[int], ...]  # per KV cache group, as vLLM gives them


@dataclass
class LoadSpec:
    """Load ``chunks`` into the request's blocks, writing tokens ``[start, end)``; with
    ``state``, load that recurrent state into block ``state_slots[i]`` of state group i."""

    req_id: str
    chunks: list[Chunk]
    block_ids: BlockIds
    start: int  # first token to write: block-aligned (vLLM's own hit ends on a block)
    end: int
    state: Chunk | None = None
    state_slots: list[int | None] = field(default_factory=list)  # None: no block holds it


@dataclass
class SaveSpec:
    """Save ``chunks``, whose tokens are computed once this step's forward is done, and
    ``states``: each a state entry and the block of every state group holding it."""

    req_id: str
    chunks: list[Chunk]
    block_ids: BlockIds
    states: list[tuple[Chunk, list[int]]] = field(default_factory=list)


@dataclass
class KVShelfMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    released: list[str] = field(default_factory=list)  # requests whose holds to drop
