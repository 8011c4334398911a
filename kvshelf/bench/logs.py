"""kvshelf's per-request lines in a vLLM server log, matched to the bench's requests.

The connector logs one line per request when vLLM allocates its blocks::

    [...] kvshelf INFO: Reqid: chatcmpl-<id>, Total tokens 2048, kvshelf hit tokens: 2048,
    need to load: 2047 (scheduler.py:NN)

The bench sends ``X-Request-Id: <id>``; vLLM names the request ``chatcmpl-<id>`` and may
add a ``-<suffix>`` of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(
    r"Reqid: (?P<req_id>[^,\s]+), Total tokens (?P<total>\d+), "
    r"kvshelf hit tokens: (?P<hit>\d+), need to load: (?P<load>\d+)"
)
_PREFIX = "chatcmpl-"


@dataclass(frozen=True)
class RequestLine:
    req_id: str  # as vLLM names it
    total_tokens: int
    hit_tokens: int  # found in kvshelf's tiers
    load_tokens: int  # of those, loaded (vLLM's own prefix cache may already hold the rest)
    line: str  # the log line as written

    def is_for(self, request_id: str) -> bool:
        """Whether this line belongs to the request sent with ``X-Request-Id: request_id``."""
        name = self.req_id.removeprefix(_PREFIX)
        return name == request_id or name.startswith(request_id + "-")


def request_lines(log_text: str) -> list[RequestLine]:
    """Every kvshelf request line in ``log_text``, in order."""
    found = []
    for line in log_text.splitlines():
        match = _LINE.search(line)
        if match:
            found.append(
                RequestLine(
                    match["req_id"],
                    int(match["total"]),
                    int(match["hit"]),
                    int(match["load"]),
                    line.strip(),
                )
            )
    return found


def line_for(lines: list[RequestLine], request_id: str) -> RequestLine | None:
    """The last line logged for ``request_id`` (None if the server logged none)."""
    return next((line for line in reversed(lines) if line.is_for(request_id)), None)
