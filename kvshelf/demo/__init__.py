"""`python -m kvshelf.demo` (what `make demo` runs): LMCache's multimodal page, offline, tiny.

The page serves four models, each with kvshelf by name, and runs vLLM's multimodal chat
client against each twice. Here each is a tiny random-weight stand-in with the same
architecture (LLaVA-1.5, Phi-3.5-vision, LLaVA-OneVision, Ultravox), served with the page's
flags; the client's requests are sent as the client sends them (image and video by URL and
base64, audio as ``input_audio``, by URL and base64; the URLs point at a local HTTP server
with generated media) and padded to ``--prompt-tokens``. Run 1 starts from an empty cache;
then the server restarts (vLLM's own prefix cache is gone, kvshelf's disk tier is not) and
run 2 sends the same requests. It prints TTFTs and kvshelf's hit tokens per request and
writes ``out/demo.json`` and ``out/demo.png``.

After every start, one warm-up request (other media) takes the first-request costs of a
fresh vLLM process (~2 s, with or without kvshelf) out of both runs, and before each
measured request the demo waits until the disk tier stops growing, so the previous
request's background saves do not compete with it for the CPU. The dtype follows what the
CPU does fast: bfloat16 where it has AVX512-BF16 or AMX, float32 elsewhere (bf16 matmuls
are emulated there, many times slower).
"""

# Modules: cli (arguments, Ctrl-C), run (the systems; build, serve and measure), report (the
# table, the checks, demo.json and demo.png), machine (the CPU and the dtype it does fast).

from kvshelf.demo.cli import main
from kvshelf.demo.machine import cpu_flags, cpu_name, pick_dtype
from kvshelf.demo.run import CHAT_TYPES, SYSTEMS, DemoSystem

__all__ = ["CHAT_TYPES", "SYSTEMS", "DemoSystem", "cpu_flags", "cpu_name", "main", "pick_dtype"]
