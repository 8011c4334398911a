"""A streaming OpenAI chat-completions client that measures time to first token (TTFT).

What TTFT counts here: from just before the request is sent (the clock starts before the
connection is opened, so it includes connecting and uploading the media) to the arrival of the
first server-sent-event chunk that carries a *generated token*:

* a non-empty ``delta.content``, ``delta.reasoning``/``reasoning_content`` or ``tool_calls``, or
* a ``logprobs.content`` entry (requested, so that a first token whose text is empty, such as a
  special token, still counts), or
* failing those, a ``finish_reason`` (the first token was a stop token).

It does not count vLLM's first chunk, which carries only ``{"role": "assistant", "content": ""}``
and may be sent before any token exists.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

CHAT_PATH = "/v1/chat/completions"
# Connect fast or fail fast; a long prompt may take minutes to prefill on a CPU.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
_MODALITY_WORDS = ("image", "audio", "video", "modalit", "multimodal", "multi-modal", "at most 0")


class BenchError(RuntimeError):
    """A bench failure with a message meant for the user (no traceback needed)."""


class ServerUnreachable(BenchError):
    """Nothing answers at the URL (refused, timed out, name not resolved)."""


class RequestRejected(BenchError):
    """The server answered with an HTTP error, or an error event in the stream."""

    def __init__(self, message: str, status: int, server_message: str):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class ModalityRejected(RequestRejected):
    """HTTP 400 for a request with media: the model most likely does not take that modality."""


class MediaError(BenchError):
    """A media file that cannot be read or whose type is unknown."""


@dataclass
class StreamResult:
    """One streamed chat completion, timed."""

    ttft_s: float  # request start -> first chunk carrying a generated token
    total_s: float  # request start -> end of stream
    first_token_via: str  # "content", "logprobs", "reasoning", "tool_calls" or "finish"
    prompt_tokens: int | None  # from the final usage chunk; None if the server sent none
    completion_tokens: int | None
    response_id: str  # the chunks' "id" (vLLM: "chatcmpl-" + X-Request-Id)
    text: str  # the generated text


def base_url(url: str) -> str:
    """``http://host:8000``, ``http://host:8000/`` and ``.../v1`` all mean the same server."""
    url = url.rstrip("/")
    url = url.removesuffix("/v1")
    if "://" not in url:
        url = "http://" + url
    return url


def list_models(client: httpx.Client, url: str) -> list[str]:
    """The model names ``GET /v1/models`` offers."""
    response = _send(client, "GET", f"{base_url(url)}/v1/models")
    if response.status_code != 200:
        raise RequestRejected(
            f"GET /v1/models at {base_url(url)} answered HTTP {response.status_code}: "
            f"{_server_message(response.text)}; pass --model",
            response.status_code,
            response.text,
        )
    return [m["id"] for m in response.json().get("data", [])]


def stream_chat(
    client: httpx.Client, url: str, body: dict[str, Any], request_id: str | None = None
) -> StreamResult:
    """Send ``body`` as a streaming chat completion and time its first token.

    Adds ``stream``, ``stream_options.include_usage`` and ``logprobs`` to a copy of
    ``body``. ``request_id`` goes out as ``X-Request-Id`` (vLLM names the request
    ``chatcmpl-<request_id>`` in its logs). Raises :class:`ServerUnreachable`,
    :class:`ModalityRejected` or :class:`RequestRejected`.
    """
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    body.setdefault("logprobs", True)
    headers = {"X-Request-Id": request_id} if request_id else {}
    endpoint = f"{base_url(url)}{CHAT_PATH}"
    began = time.perf_counter()
    try:
        with client.stream("POST", endpoint, json=body, headers=headers) as response:
            if response.status_code != 200:
                response.read()
                raise _rejection(response.status_code, response.text, body)
            return _read_stream(response, began, body)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _unreachable(url, exc) from None
    except httpx.ReadTimeout as exc:
        raise BenchError(
            f"{endpoint}: no data for {client.timeout.read} s ({exc}); the server may be "
            "overloaded or the prompt too long for it"
        ) from None
    except httpx.RemoteProtocolError as exc:
        raise BenchError(f"{endpoint}: the server closed the stream early ({exc})") from None


def _read_stream(response: httpx.Response, began: float, body: dict[str, Any]) -> StreamResult:
    ttft_s: float | None = None
    via = ""
    usage: dict[str, Any] = {}
    response_id = ""
    text: list[str] = []
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, "event:" lines
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:  # vLLM reports errors raised mid-stream this way
            raise _rejection(_error_code(chunk["error"]), json.dumps(chunk), body)
        response_id = response_id or chunk.get("id", "")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text.append(delta.get("content") or "")
            kind = _token_kind(choice, delta)
            if kind and ttft_s is None:
                ttft_s, via = time.perf_counter() - began, kind
    total_s = time.perf_counter() - began
    if ttft_s is None:
        raise BenchError(
            f"the stream ended without a generated token ({response.request.url}); is max_tokens 0?"
        )
    return StreamResult(
        ttft_s=ttft_s,
        total_s=total_s,
        first_token_via=via,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        response_id=response_id,
        text="".join(text),
    )


def _token_kind(choice: dict[str, Any], delta: dict[str, Any]) -> str:
    """Which field shows that this chunk carries a generated token ("" if none does)."""
    if delta.get("content"):
        return "content"
    if delta.get("reasoning") or delta.get("reasoning_content"):
        return "reasoning"
    if delta.get("tool_calls"):
        return "tool_calls"
    if (choice.get("logprobs") or {}).get("content"):
        return "logprobs"
    if choice.get("finish_reason"):
        return "finish"
    return ""


def _send(client: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    try:
        return client.request(method, url, **kwargs)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _unreachable(url, exc) from None


def _unreachable(url: str, exc: Exception) -> ServerUnreachable:
    return ServerUnreachable(
        f"cannot reach an OpenAI-compatible server at {base_url(url)} ({exc or type(exc).__name__})."
        " Is it running, and does --url give its host and port (e.g. http://localhost:8000)?"
    )


def _rejection(status: int, raw: str, body: dict[str, Any]) -> RequestRejected:
    message = _server_message(raw)
    modalities = _modalities(body)
    if status == 400 and modalities and any(w in message.lower() for w in _MODALITY_WORDS):
        kinds = "/".join(modalities)
        return ModalityRejected(
            f"the server rejected the {kinds} request with HTTP 400: {message}. "
            f"Model {body.get('model')!r} probably does not accept {kinds} input; "
            "choose a --chat-type it serves (or another --model).",
            status,
            message,
        )
    return RequestRejected(f"the server answered HTTP {status}: {message}", status, message)


def _server_message(raw: str) -> str:
    """The ``message`` of an OpenAI-style error body, else the raw text (shortened)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.strip()[:500]
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])[:500]
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])[:500]
    return raw.strip()[:500]


def _error_code(error: Any) -> int:
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) else 500


def _modalities(body: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for message in body.get("messages", ()):
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            kind = {
                "image_url": "image",
                "input_audio": "audio",
                "audio_url": "audio",
                "video_url": "video",
            }.get(part.get("type", ""))
            if kind and kind not in found:
                found.append(kind)
    return found
