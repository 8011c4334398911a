"""kvshelf's log lines inside a vLLM server.

vLLM only configures handlers for its own ``vllm`` loggers; records from other loggers
below WARNING would be dropped. kvshelf logs under ``kvshelf`` with its own handler,
in the same shape as LMCache's lines so existing log tooling keeps working.
"""

import logging
import sys

FORMAT = "[%(asctime)s] kvshelf %(levelname)s: %(message)s (%(filename)s:%(lineno)d)"


def configure_logging(level: int | str = logging.INFO) -> None:
    """Idempotent: give the ``kvshelf`` logger one stdout handler."""
    root = logging.getLogger("kvshelf")
    root.setLevel(level)
    root.propagate = False
    if not any(getattr(h, "_kvshelf", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._kvshelf = True  # type: ignore[attr-defined]
        root.addHandler(handler)
