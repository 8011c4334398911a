"""Tiny multimodal model directories that vLLM (CPU build) serves offline.

Each directory holds a config, a locally trained tokenizer and processor configs and, by
default, a `model.safetensors` of seeded random weights (normal, std 0.02; norms at 1; see
kvshelf.testing.checkpoints for why not vLLM's dummy weights). `dummy_weights=True` still
builds a config-only dir (no weight file; served with `--load-format dummy`) for benchmarks
and start-up tests, where the outputs do not matter. The four models of LMCache's
multimodal page (LLaVA-1.5, Phi-3.5-vision, LLaVA-OneVision, Ultravox) are written by
kvshelf.testing.reference_models.

`build_model` writes into a temporary sibling directory and renames it into place after
writing a marker file last, so a directory that has the marker is complete.

Modules: `build` (build_model, the marker), `families` (what each family accepts, its
serve flags and writer), and one module per family group: `multimodal` (Qwen2-Audio,
Idefics3), `ovis` (Ovis2.5), `hybrid` (Gemma 3, Granite 4.0-H, Qwen3.5).
"""

from kvshelf.testing.checkpoints import SIZES, SizePreset
from kvshelf.testing.models.build import (
    BUILD_FORMAT_VERSION,
    DTYPES,
    MARKER_NAME,
    WEIGHTS_FILE,
    build_model,
    read_build_info,
    serve_args,
)
from kvshelf.testing.models.families import FAMILIES, FAMILY_MODALITIES, FAMILY_REQUEST_TYPES
from kvshelf.testing.models.hybrid import chatml_tokenizer, write_gemma3_text, write_qwen3_5_vl

__all__ = [
    "BUILD_FORMAT_VERSION",
    "DTYPES",
    "FAMILIES",
    "FAMILY_MODALITIES",
    "FAMILY_REQUEST_TYPES",
    "MARKER_NAME",
    "SIZES",
    "WEIGHTS_FILE",
    "SizePreset",
    "build_model",
    "chatml_tokenizer",
    "read_build_info",
    "serve_args",
    "write_gemma3_text",
    "write_qwen3_5_vl",
]
