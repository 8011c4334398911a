"""`kvshelf bench`: TTFT of the five request types against any OpenAI-compatible server, or
of the exact request sequence of the multimodal client LMCache's page runs."""

from kvshelf.bench.client import (
    BenchError,
    MediaError,
    ModalityRejected,
    RequestRejected,
    ServerUnreachable,
    StreamResult,
    stream_chat,
)
from kvshelf.bench.logs import RequestLine, request_lines
from kvshelf.bench.payloads import REQUEST_TYPES, Media, chat_body, load_media
from kvshelf.bench.reference import run_reference
from kvshelf.bench.run import COLD, WARM, BenchRun, BenchSettings, Measurement, run_bench

__all__ = [
    "COLD",
    "REQUEST_TYPES",
    "WARM",
    "BenchError",
    "BenchRun",
    "BenchSettings",
    "Measurement",
    "Media",
    "MediaError",
    "ModalityRejected",
    "RequestLine",
    "RequestRejected",
    "ServerUnreachable",
    "StreamResult",
    "chat_body",
    "load_media",
    "request_lines",
    "run_bench",
    "run_reference",
    "stream_chat",
]
